//! `http_deny` (docs/security.md, Guardrails): destinations no `http` job may reach. Names
//! are checked as written, then every address they resolve to; the request then goes to
//! exactly the addresses checked, so a second lookup cannot answer differently.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// The default list: the link-local ranges, where cloud metadata services answer with
/// credentials, and the IPv6 address of one that answers outside them.
pub const DEFAULT_HTTP_DENY: &[&str] = &["169.254.0.0/16", "fe80::/10", "fd00:ec2::254"];

#[derive(Clone, Debug, PartialEq, Eq)]
enum Rule {
    /// Addresses in `net`, on `port` or any port.
    Net { net: IpNet, port: Option<u16> },
    /// A host name as written in URLs (lower case, no final dot), on `port` or any port.
    Host { name: String, port: Option<u16> },
    /// Steward's own listener on every local address (`listen = "0.0.0.0:PORT"`).
    AnyLocal { port: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    rule: Rule,
    /// Why: the entry as written, or "Steward's own listen address".
    why: String,
}

/// The destinations `http` jobs may not reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpDeny(Arc<[Entry]>);

/// A refused destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{dest} is denied by http_deny ({why})")]
pub struct Denied {
    pub dest: String,
    pub why: String,
}

impl HttpDeny {
    /// Parses entries: a CIDR (`10.0.0.0/8`), an address (`10.1.2.3`, `fd00::1`), an address
    /// and port (`10.1.2.3:8080`, `[fd00::1]:443`), a host name (`metadata.internal`) or a
    /// host name and port. Every bad entry is reported, by index.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<HttpDeny, Vec<String>> {
        let mut out = Vec::new();
        let mut errs = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let e = e.as_ref();
            match parse_rule(e) {
                Ok(rule) => out.push(Entry {
                    rule,
                    why: format!("entry {e:?}"),
                }),
                Err(m) => errs.push(format!("[{i}] {e:?}: {m}")),
            }
        }
        if errs.is_empty() {
            Ok(HttpDeny(out.into()))
        } else {
            Err(errs)
        }
    }

    /// Adds Steward's own listen address. A wildcard address (`0.0.0.0`, `::`) is reached on
    /// every local address, and any listener on `0.0.0.0` or `::` as a destination, so those
    /// are denied on its port too.
    pub fn with_listen(self, addr: SocketAddr) -> HttpDeny {
        let why = format!("Steward's own listen address {addr}");
        let port = addr.port();
        let mut all: Vec<Entry> = self.0.to_vec();
        let mut add = |rule| {
            all.push(Entry {
                rule,
                why: why.clone(),
            })
        };
        if addr.ip().is_unspecified() {
            add(Rule::AnyLocal { port });
        } else {
            add(Rule::Net {
                net: IpNet::from(canonical(addr.ip())),
                port: Some(port),
            });
            for any in [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ] {
                add(Rule::Net {
                    net: IpNet::from(any),
                    port: Some(port),
                });
            }
        }
        HttpDeny(all.into())
    }

    /// Refuses a host name that an entry names.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), Denied> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        for e in self.0.iter() {
            if let Rule::Host { name, port: p } = &e.rule
                && *name == host
                && p.is_none_or(|p| p == port)
            {
                return Err(Denied {
                    dest: format!("{host}:{port}"),
                    why: e.why.clone(),
                });
            }
        }
        Ok(())
    }

    /// Refuses an address an entry covers, in any form that reaches it: an IPv6 address that
    /// carries an IPv4 one (mapped, compatible, NAT64) is checked as both.
    pub fn check_addr(&self, addr: SocketAddr) -> Result<(), Denied> {
        let ip = canonical(addr.ip());
        let port = addr.port();
        let forms = [Some(ip), embedded_v4(ip)];
        for e in self.0.iter() {
            let hit = forms.iter().flatten().any(|ip| match &e.rule {
                Rule::Net { net, port: p } => net.contains(ip) && p.is_none_or(|p| p == port),
                Rule::Host { .. } => false,
                Rule::AnyLocal { port: p } => *p == port && is_local(*ip),
            });
            if hit {
                return Err(Denied {
                    dest: SocketAddr::new(ip, port).to_string(),
                    why: e.why.clone(),
                });
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for HttpDeny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&e.why)?;
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:169.254.169.254`) as the IPv4 address they reach.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The IPv4 address an IPv6 one carries: IPv4-compatible (`::a.b.c.d`, not `::` or `::1`)
/// or NAT64 (`64:ff9b::a.b.c.d`).
fn embedded_v4(ip: IpAddr) -> Option<IpAddr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let tail = Ipv4Addr::new(
        (s[6] >> 8) as u8,
        (s[6] & 0xff) as u8,
        (s[7] >> 8) as u8,
        (s[7] & 0xff) as u8,
    );
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let compatible = s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
    (nat64 || compatible).then_some(IpAddr::V4(tail))
}

/// Whether `ip` reaches this machine: loopback, a wildcard, or an address of one of its
/// interfaces (looked up now: interfaces come and go).
fn is_local(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
        addrs.any(|a| {
            a.address.is_some_and(|s| {
                s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                    || s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
            })
        })
    })
}

fn parse_rule(e: &str) -> Result<Rule, String> {
    let e = e.trim();
    if e.is_empty() {
        return Err("empty".into());
    }
    if e.contains('/') {
        let net: IpNet = e
            .parse()
            .map_err(|_| "not a CIDR such as 10.0.0.0/8 or fd00::/8".to_owned())?;
        // `::ffff:10.0.0.0/104` is `10.0.0.0/8`: addresses are checked in IPv4 form.
        let net = match (net, canonical(net.addr())) {
            (IpNet::V6(v6), IpAddr::V4(v4)) => {
                let prefix = v6.prefix_len().checked_sub(96).ok_or_else(|| {
                    "an IPv4-mapped CIDR needs a prefix of at least 96".to_owned()
                })?;
                IpNet::new(IpAddr::V4(v4), prefix)
                    .map_err(|e| e.to_string())?
                    .trunc()
            }
            (net, _) => net.trunc(),
        };
        return Ok(Rule::Net { net, port: None });
    }
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Ok(Rule::Net {
            net: IpNet::from(canonical(ip)),
            port: None,
        });
    }
    if let Ok(sa) = e.parse::<SocketAddr>() {
        return Ok(Rule::Net {
            net: IpNet::from(canonical(sa.ip())),
            port: Some(sa.port()),
        });
    }
    let (name, port) = match e.rsplit_once(':') {
        Some((name, port)) => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{port:?} is not a port (1-65535)"))?;
            (name, Some(port))
        }
        None => (e, None),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(
            "not a CIDR, an address, or a host name, each optionally with :PORT".to_owned(),
        );
    }
    Ok(Rule::Host { name, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn entries() {
        let d = HttpDeny::parse(&[
            "169.254.0.0/16",
            "10.1.2.3",
            "10.9.9.9:8080",
            "[fd00::1]:443",
            "Metadata.Internal.",
            "api.example.com:8443",
        ])
        .unwrap();
        assert!(d.check_addr(sa("169.254.169.254:80")).is_err());
        assert!(d.check_addr(sa("[::ffff:169.254.169.254]:80")).is_err());
        assert!(d.check_addr(sa("10.1.2.3:1")).is_err());
        assert!(d.check_addr(sa("10.9.9.9:8080")).is_err());
        d.check_addr(sa("10.9.9.9:8081")).unwrap();
        assert!(d.check_addr(sa("[fd00::1]:443")).is_err());
        d.check_addr(sa("[fd00::1]:80")).unwrap();
        assert!(d.check_name("metadata.internal", 80).is_err());
        assert!(d.check_name("API.example.com.", 8443).is_err());
        d.check_name("api.example.com", 443).unwrap();
        d.check_addr(sa("8.8.8.8:53")).unwrap();
        // IPv6 forms of a denied IPv4 address.
        assert!(d.check_addr(sa("[64:ff9b::a9fe:a9fe]:80")).is_err());
        assert!(d.check_addr(sa("[::a9fe:a9fe]:80")).is_err());
        let m = HttpDeny::parse(&["::ffff:10.0.0.0/104"]).unwrap();
        assert!(m.check_addr(sa("10.9.8.7:1")).is_err());
        assert!(HttpDeny::parse(&["::ffff:10.0.0.0/90"]).is_err());
        let def = HttpDeny::parse(DEFAULT_HTTP_DENY).unwrap();
        assert!(def.check_addr(sa("[fd00:ec2::254]:80")).is_err());
        assert!(def.check_addr(sa("[fe80::1]:80")).is_err());
        let e = d.check_addr(sa("169.254.1.1:80")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "169.254.1.1:80 is denied by http_deny (entry \"169.254.0.0/16\")"
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let e = HttpDeny::parse(&["10.0.0.0/33", "ok.example", "a b", "h:99999", ""]).unwrap_err();
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e[0].starts_with("[0] \"10.0.0.0/33\""), "{e:?}");
        assert!(e[1].starts_with("[2]"), "{e:?}");
        assert!(e[2].contains("99999"), "{e:?}");
    }

    #[test]
    fn own_listen_address() {
        let d = HttpDeny::default().with_listen(sa("127.0.0.1:7420"));
        assert!(d.check_addr(sa("127.0.0.1:7420")).is_err());
        assert!(d.check_addr(sa("0.0.0.0:7420")).is_err());
        assert!(d.check_addr(sa("[::]:7420")).is_err());
        d.check_addr(sa("127.0.0.1:7421")).unwrap();
        d.check_addr(sa("127.0.0.2:7420")).unwrap();
        let d = HttpDeny::default().with_listen(sa("0.0.0.0:7420"));
        assert!(d.check_addr(sa("127.0.0.5:7420")).is_err());
        assert!(d.check_addr(sa("[::1]:7420")).is_err());
        d.check_addr(sa("127.0.0.1:80")).unwrap();
    }
}
