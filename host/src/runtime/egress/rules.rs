//! Which destinations a tenant's functions may reach: the `outbound_http`
//! rules and the guard on private addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Exactly this host name.
    Exact(String),
    /// Any host name with at least one more label before this suffix.
    Subdomains(String),
    /// An address or a block of addresses. Naming addresses is how a
    /// policy opens private ones: the connection must go to one of them.
    Net(IpNet),
}

/// One allowed destination for outgoing HTTP:
/// `[scheme://]host[:port]`, where `host` is a name (`api.example.com`),
/// a wildcard (`*.example.org`), an IP address (`10.0.0.5`, `[fd00::5]`)
/// or a CIDR block (`10.0.0.0/8`, `fd00::/8`, which takes no port).
///
/// `*.example.org` matches `a.example.org` and `a.b.example.org`, but not
/// `example.org` itself (list it separately) and not
/// `a.example.org.evil.com`. Without a port every port is allowed; without
/// a scheme both `http` and `https` are, and `https://api.example.com`
/// forbids plain text to that host. Names compare case-insensitively and
/// ignore one trailing dot. A name rule lets the request be sent by name,
/// but every address the name resolves to is still checked (see
/// [`OutboundPolicy`]); an address rule opens exactly its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    https_only: Option<bool>,
    target: Target,
    port: Option<u16>,
}

/// Why an `outbound_http` entry is not a valid destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOutboundRule(String);

impl FromStr for OutboundRule {
    type Err = InvalidOutboundRule;

    fn from_str(pattern: &str) -> Result<Self, Self::Err> {
        let err = |msg: &str| Err(InvalidOutboundRule(msg.to_owned()));
        let (https_only, rest) = if let Some(rest) = pattern.strip_prefix("https://") {
            (Some(true), rest.strip_suffix('/').unwrap_or(rest))
        } else if let Some(rest) = pattern.strip_prefix("http://") {
            (Some(false), rest.strip_suffix('/').unwrap_or(rest))
        } else if pattern.contains("://") {
            return err("the only schemes are `http://` and `https://`");
        } else {
            (None, pattern)
        };
        if rest.contains('/') && rest.parse::<IpNet>().is_err() && !is_net_with_port(rest) {
            return err(
                "not a host name (letters, digits, `-` and dots; no path), address or CIDR block",
            );
        }
        // A bracketed IPv6 address, with or without a port.
        if let Some(inner) = rest.strip_prefix('[') {
            let Some((addr, after)) = inner.split_once(']') else {
                return err("an IPv6 address in brackets needs its closing `]`");
            };
            let Ok(addr) = addr.parse::<Ipv6Addr>() else {
                return err("not an IPv6 address between the brackets");
            };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(parse_port(port)?),
                    None => return err("after `]` may come only `:port`"),
                },
            };
            return Ok(Self {
                https_only,
                target: Target::Net(IpNet::from(IpAddr::V6(addr))),
                port,
            });
        }
        // An unbracketed IPv6 address or block takes no port.
        if rest.matches(':').count() > 1 {
            let net = match rest.split_once('/') {
                Some(_) => rest.parse::<IpNet>().ok(),
                None => rest.parse::<IpAddr>().ok().map(IpNet::from),
            };
            return match net {
                Some(net) => Ok(Self {
                    https_only,
                    target: Target::Net(net.trunc()),
                    port: None,
                }),
                None => err(
                    "not an IPv6 address or block (write `[addr]:port` to give an IPv6 address a port)",
                ),
            };
        }
        let (host, port) = match rest.split_once(':') {
            None => (rest, None),
            Some((host, port)) => (host, Some(parse_port(port)?)),
        };
        if host.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            let net = match host.split_once('/') {
                Some(_) => host.parse::<IpNet>().ok(),
                None => host.parse::<IpAddr>().ok().map(IpNet::from),
            };
            if let Some(net) = net {
                return Ok(Self {
                    https_only,
                    target: Target::Net(net.trunc()),
                    port,
                });
            }
        }
        let host = host.to_ascii_lowercase();
        if let Some(suffix) = host.strip_prefix("*.") {
            if !valid_host(suffix) {
                return err("after `*.` must come a host name (letters, digits, `-` and dots)");
            }
            // `*.com` would open a whole top-level domain.
            if !suffix.contains('.') {
                return err("a wildcard must be followed by at least two labels (`*.example.org`)");
            }
            return Ok(Self {
                https_only,
                target: Target::Subdomains(suffix.to_owned()),
                port,
            });
        }
        if host.contains('*') {
            return err("`*` is only allowed as the whole first label (`*.example.org`)");
        }
        if !valid_host(&host) {
            return err(
                "not a host name (letters, digits, `-` and dots; no path or trailing dot), address or CIDR block",
            );
        }
        Ok(Self {
            https_only,
            target: Target::Exact(host),
            port,
        })
    }
}

/// `10.0.0.0/8:8080`: a block with a port.
fn is_net_with_port(text: &str) -> bool {
    text.rsplit_once(':')
        .is_some_and(|(net, port)| net.parse::<IpNet>().is_ok() && parse_port(port).is_ok())
}

fn parse_port(port: &str) -> Result<u16, InvalidOutboundRule> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidOutboundRule(
            "the port must be a number (write `host`, `host:port` or `[IPv6]:port`)".to_owned(),
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(InvalidOutboundRule(
            "the port must be between 1 and 65535".to_owned(),
        )),
    }
}

impl fmt::Display for OutboundRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.https_only {
            Some(true) => f.write_str("https://")?,
            Some(false) => f.write_str("http://")?,
            None => {}
        }
        match &self.target {
            Target::Exact(host) => f.write_str(host)?,
            Target::Subdomains(suffix) => write!(f, "*.{suffix}")?,
            Target::Net(net) if net.prefix_len() == net.max_prefix_len() => match net.addr() {
                IpAddr::V6(addr) if self.port.is_some() => write!(f, "[{addr}]")?,
                addr => write!(f, "{addr}")?,
            },
            Target::Net(net) => write!(f, "{net}")?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl OutboundRule {
    fn scheme_and_port_match(&self, https: bool, port: u16) -> bool {
        self.https_only.is_none_or(|only| only == https) && self.port.is_none_or(|p| p == port)
    }

    /// Whether this rule allows a request by name to `host` on `port` over
    /// HTTPS (`https`) or plain HTTP. `host` must be a plain host name (no
    /// port, no brackets); anything else is denied. Address rules never
    /// match names.
    pub fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        if !self.scheme_and_port_match(https, port) {
            return false;
        }
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        if !valid_host(&host) {
            return false;
        }
        match &self.target {
            Target::Exact(exact) => host == *exact,
            Target::Subdomains(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|rest| rest.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
            Target::Net(_) => false,
        }
    }

    /// Whether this rule names the address `ip` (on `port`, over the
    /// scheme): an explicit grant, private addresses included.
    pub fn covers(&self, https: bool, ip: IpAddr, port: u16) -> bool {
        self.scheme_and_port_match(https, port)
            && matches!(&self.target, Target::Net(net) if net.contains(&canonical(ip)))
    }
}

/// Whether `host` is a DNS host name (or dotted IPv4 address): labels of
/// 1 to 63 ASCII letters, digits and inner hyphens, 253 characters at most.
/// Anything that could smuggle another host in (`@`, `/`, `#`, `:`,
/// whitespace) fails.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4
/// address: the kernel connects to it as such.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses of the clouds' instance-metadata services: reachable only when
/// an address rule names them, even where `outbound_private` opens the
/// other private addresses (they hand out the host's own credentials).
const METADATA: [IpAddr; 6] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// What kind of non-public address `ip` is, if it is one: loopback,
/// private, link-local, unique-local, multicast, the clouds' metadata
/// services, and the other blocks that are never a public server.
/// IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4) are judged
/// by that address.
pub fn restricted_kind(ip: IpAddr) -> Option<&'static str> {
    let ip = canonical(ip);
    if METADATA.contains(&ip) {
        return Some("cloud metadata");
    }
    match ip {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => restricted_v6(v6),
    }
}

fn restricted_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = v4.octets();
    Some(if v4.is_loopback() {
        "loopback"
    } else if v4.is_private() {
        "private"
    } else if v4.is_link_local() {
        "link-local"
    } else if v4.is_multicast() {
        "multicast"
    } else if v4.is_broadcast() || a >= 240 {
        "reserved"
    } else if a == 0 {
        "unspecified"
    } else if a == 100 && (64..128).contains(&b) {
        "shared (carrier-grade NAT)"
    } else if a == 192 && b == 0 && c == 0 {
        "IETF protocol"
    } else if v4.is_documentation() {
        "documentation"
    } else if a == 198 && (b == 18 || b == 19) {
        "benchmarking"
    } else {
        return None;
    })
}

fn restricted_v6(v6: Ipv6Addr) -> Option<&'static str> {
    let segments = v6.segments();
    let embedded = |high: u16, low: u16| {
        let [h1, h2] = high.to_be_bytes();
        let [l1, l2] = low.to_be_bytes();
        Ipv4Addr::new(h1, h2, l1, l2)
    };
    Some(if v6.is_loopback() {
        "loopback"
    } else if v6.is_unspecified() {
        "unspecified"
    } else if v6.is_multicast() {
        "multicast"
    } else if v6.is_unicast_link_local() || segments[0] & 0xffc0 == 0xfec0 {
        "link-local"
    } else if v6.is_unique_local() {
        "unique-local"
    } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
        "documentation"
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || segments[..6] == [0; 6]
        || segments[0] == 0x2002
    {
        // NAT64 and the old IPv4-compatible form carry the address in the
        // last 32 bits; 6to4 in bits 16 to 48.
        let v4 = if segments[0] == 0x2002 {
            embedded(segments[1], segments[2])
        } else {
            embedded(segments[6], segments[7])
        };
        return restricted_kind(IpAddr::V4(v4));
    } else if segments[0] == 0x2001 && segments[1] == 0 {
        // Teredo: a tunnel to wherever its server says.
        "Teredo tunnel"
    } else {
        return None;
    })
}

/// Where a request is going, as the guest wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A host name, to be resolved.
    Name(String),
    /// An IP address literal.
    Ip(IpAddr),
}

impl Destination {
    /// The destination of a URI's host (`[::1]` and `::1` both read as
    /// IPv6); `None` for an empty host.
    pub fn of_host(host: &str) -> Option<Self> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if bare.is_empty() {
            return None;
        }
        Some(match bare.parse::<IpAddr>() {
            Ok(ip) => Self::Ip(ip),
            Err(_) => Self::Name(bare.to_owned()),
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Decides which outgoing HTTP requests a guest may make: the tenant's
/// rules, and whether its functions may reach private addresses through
/// names. Nothing is allowed by default.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    rules: Arc<[OutboundRule]>,
    allow_private: bool,
}

impl OutboundPolicy {
    /// Allow what `rules` allow; with `allow_private`, names may also lead
    /// to private addresses (never to the metadata services, which only an
    /// address rule opens).
    pub fn new(rules: Arc<[OutboundRule]>, allow_private: bool) -> Self {
        Self {
            rules,
            allow_private,
        }
    }

    /// Whether nothing at all is allowed.
    pub fn denies_all(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a request to `destination` on `port` may be sent at all,
    /// before any resolution: a name must match a name rule, an address
    /// an address rule. `Err` says why not.
    pub fn admits(&self, https: bool, destination: &Destination, port: u16) -> Result<(), String> {
        let listed = match destination {
            Destination::Name(name) => self.rules.iter().any(|r| r.matches(https, name, port)),
            Destination::Ip(ip) => self.rules.iter().any(|r| r.covers(https, *ip, port)),
        };
        if listed {
            return Ok(());
        }
        let scheme = if https { "https" } else { "http" };
        let other_scheme = match destination {
            Destination::Name(name) => self.rules.iter().any(|r| r.matches(!https, name, port)),
            Destination::Ip(ip) => self.rules.iter().any(|r| r.covers(!https, *ip, port)),
        };
        Err(if other_scheme {
            format!(
                "{scheme}://{destination}:{port} is not in outbound_http (only {} is allowed there)",
                if https { "http" } else { "https" }
            )
        } else {
            format!("{scheme}://{destination}:{port} is not in outbound_http")
        })
    }

    /// Whether the address `ip`, which `name` resolved to, may be
    /// connected to: a public address may; a restricted one only under
    /// `outbound_private` (not the metadata services) or an address rule
    /// naming it.
    pub fn admits_address(
        &self,
        https: bool,
        name: &str,
        ip: IpAddr,
        port: u16,
    ) -> Result<(), String> {
        let Some(kind) = restricted_kind(ip) else {
            return Ok(());
        };
        if self.rules.iter().any(|r| r.covers(https, ip, port)) {
            return Ok(());
        }
        if self.allow_private && kind != "cloud metadata" {
            return Ok(());
        }
        let remedy = if kind == "cloud metadata" {
            "only an outbound_http entry naming the address opens it"
        } else {
            "set outbound_private = true, or list the address or its block in outbound_http"
        };
        Err(format!(
            "{name} resolves to {ip}, a {kind} address ({remedy})"
        ))
    }
}

impl fmt::Debug for OutboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules: Vec<String> = self.rules.iter().map(ToString::to_string).collect();
        f.debug_struct("OutboundPolicy")
            .field("rules", &rules)
            .field("allow_private", &self.allow_private)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str], allow_private: bool) -> OutboundPolicy {
        let rules: Vec<OutboundRule> = rules.iter().map(|r| r.parse().unwrap()).collect();
        OutboundPolicy::new(rules.into(), allow_private)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn rules_parse_and_display_in_every_form() {
        for (pattern, shown) in [
            ("api.example.com", "api.example.com"),
            ("https://api.example.com", "https://api.example.com"),
            ("https://api.example.com/", "https://api.example.com"),
            ("http://*.example.org:8080", "http://*.example.org:8080"),
            ("10.0.0.5", "10.0.0.5"),
            ("10.0.0.5:8080", "10.0.0.5:8080"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("10.0.0.0/8:5432", "10.0.0.0/8:5432"),
            ("[fd00::5]:443", "[fd00::5]:443"),
            ("[fd00::5]", "fd00::5"),
            ("fd00::/8", "fd00::/8"),
            ("::1", "::1"),
        ] {
            let rule: OutboundRule = pattern.parse().unwrap();
            assert_eq!(rule.to_string(), shown, "{pattern}");
            let again: OutboundRule = shown.parse().unwrap();
            assert_eq!(again, rule, "{pattern}");
        }
        for (pattern, needle) in [
            ("ftp://api.example.com", "schemes"),
            ("https://api.example.com/v1", "no path"),
            ("[::1", "closing"),
            ("[nope]:80", "IPv6"),
            ("[::1]x", "only `:port`"),
            ("fd00::/200", "CIDR block"),
            ("10.0.0.0/40", "host name"),
            ("10.0.0.5:0", "port"),
        ] {
            let error = pattern.parse::<OutboundRule>().unwrap_err();
            assert!(error.to_string().contains(needle), "{pattern}: {error}");
        }
    }

    #[test]
    fn schemes_ports_names_and_addresses_match_separately() {
        let p = policy(
            &[
                "https://api.example.com",
                "*.example.org:8080",
                "10.1.0.0/16",
            ],
            false,
        );
        let name = |n: &str| Destination::Name(n.to_owned());
        assert!(p.admits(true, &name("api.example.com"), 443).is_ok());
        let plain = p.admits(false, &name("api.example.com"), 80).unwrap_err();
        assert!(plain.contains("only https"), "{plain}");
        assert!(p.admits(false, &name("a.example.org"), 8080).is_ok());
        assert!(p.admits(false, &name("a.example.org"), 80).is_err());
        // An address rule opens addresses, not names, and names never
        // open addresses.
        assert!(
            p.admits(false, &Destination::Ip(ip("10.1.2.3")), 80)
                .is_ok()
        );
        assert!(
            p.admits(false, &Destination::Ip(ip("10.2.0.1")), 80)
                .is_err()
        );
        assert!(p.admits(false, &name("10.1.2.3.nip.io"), 80).is_err());
        let listed = policy(&["api.example.com"], false);
        assert!(
            listed
                .admits(true, &Destination::Ip(ip("93.184.216.34")), 443)
                .is_err()
        );
        assert!(OutboundPolicy::default().denies_all());
    }

    #[test]
    fn every_kind_of_private_address_is_recognised() {
        for (address, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.5.4", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("100.100.100.200", "cloud metadata"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique-local"),
            ("fd00:ec2::254", "cloud metadata"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a00:1", "private"),
            ("2002:c0a8:101::1", "private"),
            ("2001::1", "Teredo tunnel"),
        ] {
            assert_eq!(restricted_kind(ip(address)), Some(kind), "{address}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(restricted_kind(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn private_addresses_need_the_policy_to_say_so() {
        let named = policy(&["localhost"], false);
        let error = named
            .admits_address(false, "localhost", ip("127.0.0.1"), 80)
            .unwrap_err();
        assert!(error.contains("loopback"), "{error}");
        assert!(named.admits_address(false, "x", ip("1.1.1.1"), 80).is_ok());
        let open = policy(&["localhost"], true);
        assert!(
            open.admits_address(false, "localhost", ip("127.0.0.1"), 80)
                .is_ok()
        );
        assert!(
            open.admits_address(false, "localhost", ip("::ffff:10.0.0.1"), 80)
                .is_ok()
        );
        // Not the metadata service, even then...
        let metadata = open
            .admits_address(false, "metadata", ip("169.254.169.254"), 80)
            .unwrap_err();
        assert!(metadata.contains("cloud metadata"), "{metadata}");
        // ...unless an address rule names it.
        let named_address = policy(&["metadata.internal", "169.254.169.254:80"], false);
        assert!(
            named_address
                .admits_address(false, "metadata.internal", ip("169.254.169.254"), 80)
                .is_ok()
        );
        assert!(
            named_address
                .admits_address(false, "metadata.internal", ip("169.254.169.254"), 8080)
                .is_err()
        );
        // A block opens what it holds, over the scheme it names.
        let block = policy(&["db.internal", "https://10.0.0.0/8"], false);
        assert!(
            block
                .admits_address(true, "db.internal", ip("10.9.9.9"), 443)
                .is_ok()
        );
        assert!(
            block
                .admits_address(false, "db.internal", ip("10.9.9.9"), 80)
                .is_err()
        );
        assert!(
            block
                .admits_address(true, "db.internal", ip("192.168.0.1"), 443)
                .is_err()
        );
    }

    #[test]
    fn destinations_read_names_and_both_address_forms() {
        assert_eq!(
            Destination::of_host("[::1]"),
            Some(Destination::Ip(ip("::1")))
        );
        assert_eq!(
            Destination::of_host("127.0.0.1"),
            Some(Destination::Ip(ip("127.0.0.1")))
        );
        assert_eq!(
            Destination::of_host("api.example.com"),
            Some(Destination::Name("api.example.com".to_owned()))
        );
        assert_eq!(Destination::of_host(""), None);
        assert_eq!(Destination::Ip(ip("::1")).to_string(), "[::1]");
    }
}
