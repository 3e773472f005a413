//! Genesys Cloud regions: the AWS-style name and the Genesys Cloud domain of each, and the
//! `login.`/`api.` hosts a domain implies.

/// (AWS region name, Genesys Cloud domain), as published by Genesys.
pub const REGIONS: &[(&str, &str)] = &[
    ("us-east-1", "mypurecloud.com"),
    ("us-east-2", "use2.us-gov-pure.cloud"),
    ("us-west-2", "usw2.pure.cloud"),
    ("ca-central-1", "cac1.pure.cloud"),
    ("sa-east-1", "sae1.pure.cloud"),
    ("mx-central-1", "mxc1.pure.cloud"),
    ("eu-west-1", "mypurecloud.ie"),
    ("eu-west-2", "euw2.pure.cloud"),
    ("eu-central-1", "mypurecloud.de"),
    ("eu-central-2", "euc2.pure.cloud"),
    ("me-central-1", "mec1.pure.cloud"),
    ("ap-south-1", "aps1.pure.cloud"),
    ("ap-northeast-1", "mypurecloud.jp"),
    ("ap-northeast-2", "apne2.pure.cloud"),
    ("ap-northeast-3", "apne3.pure.cloud"),
    ("ap-southeast-1", "apse1.pure.cloud"),
    ("ap-southeast-2", "mypurecloud.com.au"),
];

/// The Genesys Cloud domain for a region given either as a domain or as its AWS name
/// (case-insensitive, surrounding whitespace ignored).
pub fn domain_for(region: &str) -> Option<&'static str> {
    let wanted = region.trim().to_ascii_lowercase();
    REGIONS
        .iter()
        .find(|(aws, domain)| *aws == wanted || *domain == wanted)
        .map(|(_, domain)| *domain)
}

/// `https://api.{domain}`.
pub fn api_base_url(domain: &str) -> String {
    format!("https://api.{domain}")
}

/// `https://login.{domain}`.
pub fn login_base_url(domain: &str) -> String {
    format!("https://login.{domain}")
}

/// Every accepted region, for error messages: `us-east-1 (mypurecloud.com), ...`.
pub fn known_regions() -> String {
    REGIONS
        .iter()
        .map(|(aws, domain)| format!("{aws} ({domain})"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_domain_and_aws_name() {
        assert_eq!(domain_for("eu-central-1"), Some("mypurecloud.de"));
        assert_eq!(domain_for("mypurecloud.de"), Some("mypurecloud.de"));
        assert_eq!(domain_for(" AP-SOUTHEAST-2 "), Some("mypurecloud.com.au"));
        assert_eq!(
            domain_for("use2.us-gov-pure.cloud"),
            Some("use2.us-gov-pure.cloud")
        );
        assert_eq!(domain_for("mars-north-1"), None);
    }

    #[test]
    fn hosts_follow_genesys_convention() {
        assert_eq!(api_base_url("mypurecloud.ie"), "https://api.mypurecloud.ie");
        assert_eq!(
            login_base_url("mypurecloud.ie"),
            "https://login.mypurecloud.ie"
        );
        assert!(known_regions().contains("eu-west-2 (euw2.pure.cloud)"));
    }
}
