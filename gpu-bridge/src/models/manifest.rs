//! `gust-model.toml`: what a model folder holds and how to check it.
//!
//! A manifest names the model, its family and compute dtype, and lists every
//! file with its sha256, so the registry can refuse a folder whose files were
//! swapped or truncated before any byte reaches a device. Unknown keys are
//! errors (a misspelt `max_batch` silently ignored would be worse), and every
//! error names the manifest file, the line and the key.
//!
//! ```toml
//! name = "all-minilm-l6-v2"
//! family = "bert"
//! dtype = "f32"
//! linear_weights = "f16"   # optional: how linear layers stay resident
//!
//! [[files]]
//! path = "model.safetensors"
//! sha256 = "53aa5117…"
//! role = "weights"
//! format = "safetensors"
//!
//! [batching]
//! max_batch = 32
//! max_delay_ms = 5
//! ```

use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{BridgeError, Result};

/// The file name the registry looks for in each model folder.
pub const MANIFEST_FILE: &str = "gust-model.toml";

/// The dtype a model computes in (its weights may be stored in another,
/// e.g. quantized GGUF blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
}

impl ModelDType {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// The bridge dtype of the same name.
    pub fn to_dtype(self) -> crate::DType {
        match self {
            Self::F32 => crate::DType::F32,
            Self::F16 => crate::DType::F16,
            Self::BF16 => crate::DType::BF16,
        }
    }
}

impl fmt::Display for ModelDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileRole {
    /// Tensors to upload to the device.
    Weights,
    /// Model hyper-parameters (e.g. Hugging Face `config.json`).
    Config,
    /// The tokenizer (e.g. `tokenizer.json`).
    Tokenizer,
}

impl FileRole {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weights => "weights",
            Self::Config => "config",
            Self::Tokenizer => "tokenizer",
        }
    }
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// Hugging Face safetensors: a JSON header, then raw little-endian data.
    Safetensors,
    /// llama.cpp GGUF (v2/v3; quantized blocks are expanded to f32 on load).
    Gguf,
    /// JSON (configs, tokenizers).
    Json,
}

impl FileFormat {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    /// Path relative to the model folder (never absolute, never `..`).
    pub path: PathBuf,
    /// Expected sha256, 64 lowercase hex digits.
    pub sha256: String,
    /// What the file is for.
    pub role: FileRole,
    /// The format as written in the manifest, if it was.
    pub format: Option<FileFormat>,
}

impl ModelFile {
    /// The format as written, or else guessed from the extension
    /// (`.safetensors`, `.gguf`, `.json`), so short manifests still say
    /// what a loader will find.
    pub fn effective_format(&self) -> Option<FileFormat> {
        self.format
            .or_else(|| match self.path.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => Some(FileFormat::Safetensors),
                Some("gguf") => Some(FileFormat::Gguf),
                Some("json") => Some(FileFormat::Json),
                _ => None,
            })
    }
}

/// Dynamic batching of concurrent `embed` and `run` calls to one resident
/// model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// The most rows one batch may hold: texts for `embed` and bert `run`,
    /// entries along dimension 0 of the inputs for a generic `run`. A single
    /// request with more runs as a batch of its own.
    pub max_batch: u32,
    /// How long the first request of a batch may wait for others.
    pub max_delay_ms: u64,
    /// The most requests that may wait for a batch; one more is refused
    /// with `quota-exceeded`. Defaults to four batches' worth.
    #[serde(default)]
    pub max_queue: Option<u32>,
}

impl Batching {
    /// The queue bound in effect.
    pub fn queue_limit(&self) -> usize {
        self.max_queue
            .map_or(self.max_batch as usize * 4, |q| q as usize)
            .max(1)
    }
}

/// The forward pass of a `generic` model, written in its manifest: named
/// inputs, then steps that each apply one op to graph inputs, weights (by
/// tensor name) or earlier steps' outputs.
///
/// ```toml
/// [graph]
/// inputs = ["x"]
/// outputs = ["probabilities"]
///
/// [[graph.steps]]
/// op = "linear"            # x @ w1 + b1, w1 laid out [in, out]
/// inputs = ["x", "w1", "b1"]
/// output = "hidden"
///
/// [[graph.steps]]
/// op = "relu"
/// inputs = ["hidden"]
/// output = "activated"
///
/// [[graph.steps]]
/// op = "softmax"
/// inputs = ["activated"]
/// output = "probabilities"
/// dim = -1
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    /// The names `run` takes, in any order.
    pub inputs: Vec<String>,
    /// The values `run` returns, by name.
    pub outputs: Vec<String>,
    /// The ops, in order.
    pub steps: Vec<GraphStep>,
}

/// One op of a [`GraphSpec`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphStep {
    /// `matmul`, `linear` (x, weight `[in, out]`, bias), `add`, `sub`,
    /// `mul`, `div`, `relu`, `gelu`, `silu`, `tanh`, `exp`, `softmax`,
    /// `layer_norm` (x, weight, bias), `rms_norm` (x, weight).
    pub op: String,
    /// Operands: graph inputs, weight tensors or earlier outputs.
    pub inputs: Vec<String>,
    /// The name of the result.
    pub output: String,
    /// The dimension, for `softmax` (default -1).
    #[serde(default)]
    pub dim: Option<i32>,
    /// Epsilon, for the norms (default 1e-5).
    #[serde(default)]
    pub eps: Option<f32>,
}

/// A validated `gust-model.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelManifest {
    /// The model's name, unique in a registry: `^[a-z0-9][a-z0-9._-]{0,127}$`.
    pub name: String,
    /// The architecture family (`bert`, `llama`, `generic`, ...), which
    /// tells a runner how to wire the tensors.
    pub family: String,
    /// The dtype the model computes in.
    pub dtype: ModelDType,
    /// `linear_weights`: the dtype a model's linear-layer weight matrices
    /// are kept in on a device that multiplies 16-bit weights into f32
    /// (`linear` on the cpu backend), whatever the file stores. `None`
    /// leaves it to the family: the bert family keeps bf16 there (half the
    /// memory and memory traffic of f32; where the CPU has AVX-512 BF16
    /// the inputs are rounded to bf16 too and multiplied in pairs), with
    /// embeddings within cosine 0.9999 of f32 weights; `f16` rounds the
    /// weights only, `f32` keeps full precision. Other devices and
    /// families compute as before.
    pub linear_weights: Option<ModelDType>,
    /// Every file of the model, in manifest order.
    pub files: Vec<ModelFile>,
    /// Batching hints, if given.
    pub batching: Option<Batching>,
    /// The forward pass of a `generic` model, if it has one.
    pub graph: Option<GraphSpec>,
}

// The manifest as written, with spans kept for the values the validation
// below can reject, so those errors point at a line too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: Spanned<String>,
    family: Spanned<String>,
    dtype: ModelDType,
    #[serde(default)]
    linear_weights: Option<ModelDType>,
    files: Vec<RawFile>,
    #[serde(default)]
    batching: Option<Spanned<Batching>>,
    #[serde(default)]
    graph: Option<Spanned<GraphSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: Spanned<String>,
    sha256: Spanned<String>,
    role: FileRole,
    #[serde(default)]
    format: Option<FileFormat>,
}

impl ModelManifest {
    /// Read and validate the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                crate::ErrorCode::NotFound
            } else {
                crate::ErrorCode::InvalidArgument
            };
            BridgeError::new(code, format!("{}: cannot read: {e}", path.display())).with_source(e)
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate manifest `text`; `origin` names the file in
    /// errors, which read `origin:line:column: key `k`: what is wrong`.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let at = |span: Option<Range<usize>>, key: Option<&str>, message: &str| {
            located(text, origin, span, key, message)
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| at(e.span(), None, e.message()))?;

        let name = raw.name.get_ref();
        if !valid_name(name) {
            return Err(at(
                Some(raw.name.span()),
                Some("name"),
                &format!(
                    "{name:?} is not a valid model name (lowercase letters, digits, '.', '_' \
                     and '-', starting with a letter or digit, at most 128 characters)"
                ),
            ));
        }
        let family = raw.family.get_ref();
        if !valid_family(family) {
            return Err(at(
                Some(raw.family.span()),
                Some("family"),
                &format!(
                    "{family:?} is not a valid family (lowercase letters, digits, '_' and '-', \
                     e.g. \"bert\", \"llama\" or \"generic\")"
                ),
            ));
        }
        if let Some(b) = &raw.batching
            && b.get_ref().max_batch == 0
        {
            return Err(at(
                Some(b.span()),
                Some("batching.max_batch"),
                "must be at least 1",
            ));
        }

        let graph = match raw.graph {
            Some(graph) => {
                let span = graph.span();
                let graph = graph.into_inner();
                if let Err(why) = check_graph(&graph) {
                    return Err(at(Some(span), Some("graph"), &why));
                }
                Some(graph)
            }
            None => None,
        };

        let mut files: Vec<ModelFile> = Vec::with_capacity(raw.files.len());
        for (i, file) in raw.files.into_iter().enumerate() {
            let path = validate_relative(file.path.get_ref()).map_err(|why| {
                at(
                    Some(file.path.span()),
                    Some(&format!("files[{i}].path")),
                    &why,
                )
            })?;
            if files.iter().any(|f| f.path == path) {
                return Err(at(
                    Some(file.path.span()),
                    Some(&format!("files[{i}].path")),
                    &format!("{} is listed twice", path.display()),
                ));
            }
            let sha256 = file.sha256.get_ref().to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(at(
                    Some(file.sha256.span()),
                    Some(&format!("files[{i}].sha256")),
                    &format!(
                        "{:?} is not a sha256 (64 hex digits)",
                        file.sha256.get_ref()
                    ),
                ));
            }
            files.push(ModelFile {
                path,
                sha256,
                role: file.role,
                format: file.format,
            });
        }
        if !files.iter().any(|f| f.role == FileRole::Weights) {
            return Err(at(
                None,
                Some("files"),
                "no [[files]] entry has role = \"weights\"",
            ));
        }

        Ok(Self {
            name: name.clone(),
            family: family.clone(),
            dtype: raw.dtype,
            linear_weights: raw.linear_weights,
            files,
            batching: raw.batching.map(Spanned::into_inner),
            graph,
        })
    }

    /// The files with role `weights`, in manifest order.
    pub fn weights(&self) -> impl Iterator<Item = &ModelFile> {
        self.files.iter().filter(|f| f.role == FileRole::Weights)
    }

    /// The first file with `role`, if any.
    pub fn file(&self, role: FileRole) -> Option<&ModelFile> {
        self.files.iter().find(|f| f.role == role)
    }
}

/// The ops a graph step may name, with how many operands each takes.
pub const GRAPH_OPS: &[(&str, usize)] = &[
    ("matmul", 2),
    ("linear", 3),
    ("add", 2),
    ("sub", 2),
    ("mul", 2),
    ("div", 2),
    ("relu", 1),
    ("gelu", 1),
    ("silu", 1),
    ("tanh", 1),
    ("exp", 1),
    ("softmax", 1),
    ("layer_norm", 3),
    ("rms_norm", 2),
];

/// What can be checked without the weights: known ops with the right
/// operand count, names defined once, outputs produced.
fn check_graph(graph: &GraphSpec) -> std::result::Result<(), String> {
    let mut defined: Vec<&str> = graph.inputs.iter().map(String::as_str).collect();
    for (i, step) in graph.steps.iter().enumerate() {
        let Some((_, arity)) = GRAPH_OPS.iter().find(|(name, _)| *name == step.op) else {
            let known: Vec<&str> = GRAPH_OPS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "steps[{i}]: unknown op {:?} (known: {})",
                step.op,
                known.join(", ")
            ));
        };
        if step.inputs.len() != *arity {
            return Err(format!(
                "steps[{i}]: {} takes {arity} inputs, got {}",
                step.op,
                step.inputs.len()
            ));
        }
        if defined.contains(&step.output.as_str()) {
            return Err(format!("steps[{i}]: `{}` is defined twice", step.output));
        }
        defined.push(&step.output);
    }
    if graph.inputs.is_empty() || graph.outputs.is_empty() {
        return Err("a graph needs at least one input and one output".into());
    }
    for output in &graph.outputs {
        if !graph.steps.iter().any(|s| &s.output == output) {
            return Err(format!("output `{output}` is not produced by any step"));
        }
    }
    Ok(())
}

/// `^[a-z0-9][a-z0-9._-]{0,127}$`, without a regex engine.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.len() <= 128
        && bytes.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

fn valid_family(family: &str) -> bool {
    !family.is_empty()
        && family.len() <= 64
        && family
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// A path inside the model folder: relative, made of plain names only, so a
/// manifest cannot point the registry at files outside its folder.
fn validate_relative(path: &str) -> std::result::Result<PathBuf, String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.contains('\\') {
        return Err(format!("{path:?}: use '/' as the separator"));
    }
    let mut clean = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("{path:?} must not contain '..'"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "{path:?} must be relative to the model folder, not absolute"
                ));
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(format!("{path:?} names no file"));
    }
    Ok(clean)
}

/// An `invalid-argument` error naming the file, the line and column of
/// `span` (when known) and the key.
fn located(
    text: &str,
    origin: &Path,
    span: Option<Range<usize>>,
    key: Option<&str>,
    message: &str,
) -> BridgeError {
    let mut out = origin.display().to_string();
    if let Some(span) = span {
        let start = span.start.min(text.len());
        let before = text.get(..start).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before, |i| before.get(i + 1..).unwrap_or(""))
            .chars()
            .count()
            + 1;
        out.push_str(&format!(":{line}:{column}"));
        // toml's own errors carry no key; the one written on that line
        // (and the table it sits in) is what a person looks for.
        let key = key.map(str::to_owned).or_else(|| key_on_line(text, start));
        if let Some(key) = key {
            out.push_str(&format!(": key `{key}`"));
        }
    } else if let Some(key) = key {
        out.push_str(&format!(": key `{key}`"));
    }
    out.push_str(": ");
    out.push_str(message.trim_end());
    BridgeError::invalid(out)
}

/// The dotted key assigned on the line holding byte `offset`, prefixed by
/// the nearest table header above it, if the line assigns one.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let line_start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next().unwrap_or("");
    let table = text
        .get(..line_start)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let trimmed = line.trim();
    let key = if trimmed.starts_with('[') {
        return Some(
            trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned(),
        );
    } else {
        trimmed.split('=').next()?.trim()
    };
    if key.is_empty() {
        return None;
    }
    Some(match table {
        Some(table) if !table.is_empty() => format!("{table}.{key}"),
        _ => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "tiny-bert"
family = "bert"
dtype = "f32"

[[files]]
path = "model.safetensors"
sha256 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
role = "weights"

[[files]]
path = "./sub/config.json"
sha256 = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
role = "config"
format = "json"

[batching]
max_batch = 8
max_delay_ms = 2
"#;

    fn parse(text: &str) -> Result<ModelManifest> {
        ModelManifest::parse(text, Path::new("m/gust-model.toml"))
    }

    #[test]
    fn a_good_manifest_parses_and_normalizes() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.name, "tiny-bert");
        assert_eq!(m.dtype, ModelDType::F32);
        assert_eq!(m.linear_weights, None);
        let bf16 = parse(&GOOD.replace(
            "dtype = \"f32\"",
            "dtype = \"f32\"\nlinear_weights = \"bf16\"",
        ))
        .unwrap();
        assert_eq!(bf16.linear_weights, Some(ModelDType::BF16));
        assert!(
            parse(&GOOD.replace(
                "dtype = \"f32\"",
                "dtype = \"f32\"\nlinear_weights = \"q4\""
            ))
            .is_err()
        );
        assert_eq!(m.files[0].sha256, "a".repeat(64));
        assert_eq!(m.files[0].effective_format(), Some(FileFormat::Safetensors));
        assert_eq!(m.files[1].path, PathBuf::from("sub/config.json"));
        assert_eq!(
            m.batching,
            Some(Batching {
                max_batch: 8,
                max_delay_ms: 2,
                max_queue: None,
            })
        );
        assert_eq!(m.weights().count(), 1);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = parse(&GOOD.replace("role = \"config\"", "role = \"cfg\"")).unwrap_err();
        assert!(err.message.starts_with("m/gust-model.toml:14:"), "{err}");
        assert!(err.message.contains("files.role"), "{err}");

        let err = parse(&GOOD.replace("max_delay_ms", "max_delay")).unwrap_err();
        assert!(err.message.contains(":19:"), "{err}");
        assert!(err.message.contains("max_delay"), "{err}");

        let err = parse(&GOOD.replace("tiny-bert", "Tiny")).unwrap_err();
        assert!(err.message.contains(":2:8: key `name`"), "{err}");

        let err = parse(&GOOD.replace("./sub/config.json", "../x.json")).unwrap_err();
        assert!(err.message.contains("key `files[1].path`"), "{err}");
        assert!(err.message.contains("'..'"), "{err}");

        let err = parse(&GOOD.replace("model.safetensors", "/etc/passwd")).unwrap_err();
        assert!(err.message.contains("absolute"), "{err}");

        let err = parse(&GOOD.replace("bbbb", "zz")).unwrap_err();
        assert!(err.message.contains("files[1].sha256"), "{err}");

        let err = parse(&GOOD.replace("role = \"weights\"", "role = \"config\"")).unwrap_err();
        assert!(err.message.contains("weights"), "{err}");
    }

    #[test]
    fn names_follow_the_pattern() {
        assert!(valid_name("a"));
        assert!(valid_name("all-minilm-l6-v2"));
        assert!(valid_name("0.5b_x"));
        assert!(!valid_name(""));
        assert!(!valid_name("-a"));
        assert!(!valid_name(".a"));
        assert!(!valid_name("aB"));
        assert!(valid_name(&"a".repeat(128)));
        assert!(!valid_name(&"a".repeat(129)));
    }
}
