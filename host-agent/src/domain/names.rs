//! Names and their checks: what an ACME CA can issue for, what the agent may
//! name a Secret, which on-demand names a pattern allows and what the
//! agent calls their certificates.

/// Whether `pattern` (an `[on_demand] allow` entry) allows `name`.
pub fn on_demand_allows(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|label| label.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == name,
    }
}

/// A DNS name an ACME CA can issue for (without a wildcard label).
pub fn is_valid_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.contains('.')
        // No top-level domain is all digits: such a name is an address.
        && domain
            .rsplit('.')
            .next()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Prefix of the Secrets the agent keeps its own state in (Kubernetes mode).
pub const RESERVED_PREFIX: &str = "acme-agent-";

/// A Kubernetes label value that is also a Secret name: 1-63 of `[a-z0-9-]`,
/// starting and ending with a letter or digit.
pub fn is_kubernetes_label_value(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| alnum(b) || b == b'-')
        && name.bytes().next().is_some_and(alnum)
        && name.bytes().last().is_some_and(alnum)
}

/// The address `text` names (with or without IPv6 brackets), if it is one.
pub fn ip_identifier(text: &str) -> Option<std::net::IpAddr> {
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok()
}

/// An IPv4 or IPv6 literal, which must not be ordered as a DNS name.
pub fn is_ip_literal(domain: &str) -> bool {
    domain.parse::<std::net::IpAddr>().is_ok()
        || domain
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
}

/// Longest token the filters accept (longer ones are never answered).
pub const MAX_TOKEN_LEN: usize = 256;

/// Prefix of on-demand certificates' names.
pub const NAME_PREFIX: &str = "od-";

/// The certificate name for an on-demand `domain`: `od-` and the domain
/// with dots as underscores (no DNS name has one, so two domains never share
/// a name), shortened with a digest when longer than 64.
pub fn name_for(domain: &str) -> String {
    let name = format!("{NAME_PREFIX}{}", domain.replace('.', "_"));
    if name.len() <= 64 {
        return name;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, domain.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}-{hex}", &name[..47])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_allow_exact_names_and_one_more_label() {
        assert!(on_demand_allows("shop.example.com", "shop.example.com"));
        assert!(!on_demand_allows("shop.example.com", "a.shop.example.com"));
        assert!(on_demand_allows("*.shop.example.com", "a.shop.example.com"));
        assert!(!on_demand_allows("*.shop.example.com", "shop.example.com"));
        assert!(!on_demand_allows(
            "*.shop.example.com",
            "a.b.shop.example.com"
        ));
        assert!(!on_demand_allows(
            "*.shop.example.com",
            "evilshop.example.com"
        ));
        assert!(!on_demand_allows("*.shop.example.com", ".shop.example.com"));
    }

    #[test]
    fn names_are_distinct_bounded_and_valid() {
        assert_eq!(name_for("a.shop.example.com"), "od-a_shop_example_com");
        assert_ne!(name_for("a-b.example.com"), name_for("a.b-example.com"));
        let long = format!("{}.example.com", "x".repeat(200));
        let name = name_for(&long);
        assert!(name.len() <= 64, "{name}");
        assert_ne!(name, name_for(&format!("{}.example.com", "x".repeat(199))));
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }
}
