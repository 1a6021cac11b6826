//! Where webhooks may go: never loopback, private, link-local, unique-local, unspecified,
//! multicast, CGNAT or metadata addresses (IPv4 and IPv6, v4-mapped included) unless
//! `EMP_WEBHOOK_ALLOW_PRIVATE=true`.
//!
//! Checked twice: at submit on the URL alone (literal addresses and `localhost` → `422`), and
//! at delivery by [`GuardedResolver`], which resolves the host itself and hands the HTTP
//! client only addresses it checked, so a name that later resolves somewhere private (DNS
//! rebinding) is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether a webhook must never be sent to `ip`.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, the cloud metadata address included
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    let segments = ip.segments();
    let embedded_v4 = |high: u16, low: u16| {
        Ipv4Addr::new(
            (high >> 8) as u8,
            (high & 0xff) as u8,
            (low >> 8) as u8,
            (low & 0xff) as u8,
        )
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (segments[0] & 0xffc0) == 0xfe80 // link local fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site local fec0::/10
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        // IPv4-compatible ::a.b.c.d and NAT64 64:ff9b::a.b.c.d reach the embedded address.
        || (segments[..6] == [0; 6] && is_forbidden_v4(embedded_v4(segments[6], segments[7])))
        || (segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            && is_forbidden_v4(embedded_v4(segments[6], segments[7])))
        // 6to4 2002:a.b.c.d::/48 as well.
        || (segments[0] == 0x2002 && is_forbidden_v4(embedded_v4(segments[1], segments[2])))
}

/// Host names that are local whatever DNS says.
fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host == "metadata.google.internal"
        || host == "metadata"
}

/// Why `url` may not receive webhooks judging by the URL alone (a literal address or a local
/// name), or `None`. Names are resolved and checked again at every delivery.
pub fn refusal_at_submit(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    match parsed.host()? {
        url::Host::Ipv4(ip) if is_forbidden(IpAddr::V4(ip)) => Some(format!(
            "must not point at a loopback, private, link-local or metadata address ({ip})"
        )),
        url::Host::Ipv6(ip) if is_forbidden(IpAddr::V6(ip)) => Some(format!(
            "must not point at a loopback, private, link-local or metadata address ({ip})"
        )),
        url::Host::Domain(name) if is_local_name(name) => {
            Some(format!("must not point at a local host name ({name})"))
        }
        _ => None,
    }
}

/// Why the literal address or local name in `url` is refused at delivery, or `None` (names
/// are then checked by [`GuardedResolver`] when they are resolved).
pub fn refusal_at_delivery(url: &url::Url) -> Option<String> {
    refusal_at_submit(url.as_str())
}

/// A resolver for the webhook client: resolves with the system resolver, and refuses a name
/// if any of its addresses is forbidden (unless private addresses are allowed). The client
/// connects only to the addresses returned here.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    /// `EMP_WEBHOOK_ALLOW_PRIVATE`.
    pub allow_private: bool,
}

/// A host name that resolved to a forbidden address.
#[derive(Debug, thiserror::Error)]
#[error(
    "{host} resolves to {address}, a loopback, private, link-local or metadata address; refused"
)]
pub struct ForbiddenAddress {
    /// The name.
    pub host: String,
    /// The first forbidden address it resolved to.
    pub address: IpAddr,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(bad) = found.iter().find(|address| is_forbidden(address.ip())) {
                    return Err(Box::new(ForbiddenAddress {
                        host,
                        address: bad.ip(),
                    })
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_addresses() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "ff02::1",
        ] {
            assert!(is_forbidden(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_forbidden(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn urls_refused_at_submit() {
        for bad in [
            "http://127.0.0.1/x",
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://[::1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://169.254.169.254/latest/meta-data",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://metadata.google.internal/",
        ] {
            assert!(refusal_at_submit(bad).is_some(), "{bad}");
        }
        for good in ["https://example.com/hook", "http://93.184.216.34:8080/"] {
            assert_eq!(refusal_at_submit(good), None, "{good}");
        }
    }
}
