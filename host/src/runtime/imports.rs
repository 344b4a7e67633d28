//! What the host's linker provides, by name, to explain unsatisfied imports.
//!
//! The linker itself is the authority (`instantiate_pre` decides); this list
//! only turns its first error into the complete list a user needs to fix
//! their component in one go. `build.rs` makes it from the worlds the
//! linker is built from, so it names what is linked.

include!(concat!(env!("OUT_DIR"), "/provided.rs"));

/// Splits `ns:pkg/iface@1.2.3` into the name and the part of the version
/// that semver compatibility pins: the major for 1.x+, major.minor for 0.x,
/// all of it for a pre-release (`0.2.0-draft` is compatible with nothing
/// else, as Wasmtime's linker has it).
fn compat_key(name: &str) -> (&str, String) {
    let (base, version) = name.split_once('@').unwrap_or((name, ""));
    if version.contains('-') {
        return (base, version.to_owned());
    }
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
pub fn is_provided(name: &str) -> bool {
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
        // WASI 0.3 is linked beside 0.2, not anything later.
        assert!(is_provided("wasi:http/types@0.3.0"));
        assert!(!is_provided("wasi:http/types@0.4.0"));
        assert!(!is_provided("acme:thing/api@1.0.0"));
        assert!(!is_provided("wasi:keyvalue/store@0.2.0"));
        assert!(!is_provided("wasi:keyvalue/store@0.2.0-draft2"));
        // Every package the linker gets, wasi:nn and the platform's
        // standard interfaces included.
        for linked in [
            "wasi:nn/graph@0.2.0-rc-2024-10-28",
            "wasi:keyvalue/atomics@0.2.0-draft",
            "wasi:config/store@0.2.0-rc.1",
            "gust:function/output@0.1.0",
            "wasi:sockets/tcp@0.2.0",
        ] {
            assert!(is_provided(linked), "{linked}");
        }
        assert!(same_interface(
            "gust:function/handler@0.1.2",
            "gust:function/handler@0.1.0"
        ));
    }
}
