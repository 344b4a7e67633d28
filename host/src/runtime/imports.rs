//! What the host's linker provides, by name, to explain unsatisfied imports.
//!
//! The linker itself is the authority (`instantiate_pre` decides); this list
//! only turns its first error into the complete list a user needs to fix
//! their component in one go.

/// Interfaces the linker defines, `namespace:package/interface@version`.
const PROVIDED: &[&str] = &[
    "wasi:cli/environment@0.2.12",
    "wasi:cli/exit@0.2.12",
    "wasi:cli/stdin@0.2.12",
    "wasi:cli/stdout@0.2.12",
    "wasi:cli/stderr@0.2.12",
    "wasi:cli/terminal-input@0.2.12",
    "wasi:cli/terminal-output@0.2.12",
    "wasi:cli/terminal-stdin@0.2.12",
    "wasi:cli/terminal-stdout@0.2.12",
    "wasi:cli/terminal-stderr@0.2.12",
    "wasi:clocks/monotonic-clock@0.2.12",
    "wasi:clocks/wall-clock@0.2.12",
    "wasi:filesystem/types@0.2.12",
    "wasi:filesystem/preopens@0.2.12",
    "wasi:io/error@0.2.12",
    "wasi:io/poll@0.2.12",
    "wasi:io/streams@0.2.12",
    "wasi:random/random@0.2.12",
    "wasi:random/insecure@0.2.12",
    "wasi:random/insecure-seed@0.2.12",
    "wasi:sockets/network@0.2.12",
    "wasi:sockets/instance-network@0.2.12",
    "wasi:sockets/udp@0.2.12",
    "wasi:sockets/udp-create-socket@0.2.12",
    "wasi:sockets/tcp@0.2.12",
    "wasi:sockets/tcp-create-socket@0.2.12",
    "wasi:sockets/ip-name-lookup@0.2.12",
    "wasi:http/types@0.2.12",
    "wasi:http/outgoing-handler@0.2.12",
    "gust:function/output@0.1.0",
    "gust:gpu/types@0.1.0",
    "gust:gpu/tensors@0.1.0",
    "gust:gpu/layers@0.1.0",
    "gust:gpu/models@0.1.0",
];

/// Splits `ns:pkg/iface@1.2.3` into the name and the part of the version
/// that semver compatibility pins: the major for 1.x+, major.minor for 0.x.
fn compat_key(name: &str) -> (&str, String) {
    let (base, version) = name.split_once('@').unwrap_or((name, ""));
    let mut parts = version.split('.');
    let major = parts.next().unwrap_or("");
    let minor = parts.next().unwrap_or("");
    let pinned = if major == "0" {
        format!("0.{minor}")
    } else {
        major.to_owned()
    };
    (base, pinned)
}

/// Whether two interface names are semver-compatible versions of one interface.
pub(crate) fn same_interface(a: &str, b: &str) -> bool {
    compat_key(a) == compat_key(b)
}

/// Whether the host provides the import `name` (semver-compatibly).
pub(crate) fn is_provided(name: &str) -> bool {
    PROVIDED
        .iter()
        .any(|provided| same_interface(name, provided))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_compatible_names_match() {
        assert!(is_provided("wasi:cli/environment@0.2.0"));
        assert!(is_provided("wasi:io/streams@0.2.3"));
        assert!(!is_provided("wasi:io/streams@0.3.0"));
        assert!(is_provided("wasi:http/types@0.2.0"));
        assert!(!is_provided("wasi:http/types@0.3.0"));
        assert!(!is_provided("acme:thing/api@1.0.0"));
        assert!(same_interface(
            "gust:function/handler@0.1.2",
            "gust:function/handler@0.1.0"
        ));
    }
}
