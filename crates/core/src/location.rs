//! BigQuery dataset locations, as an operator names them (`tenant add --location`).
//!
//! A dataset's location is fixed when it is created: an NGO bound to keep its data in the EU
//! cannot have it moved later. So a location is checked for its form before anything is
//! created, and an existing dataset's location is compared with it, never silently accepted.

/// BigQuery's multi-regions; everything else is a region such as `europe-west1`.
const MULTI_REGIONS: [&str; 2] = ["US", "EU"];

/// `s` as BigQuery names it (multi-regions upper case, regions lower case), or an error naming
/// it. A region is checked for its form (`<area>-<direction><n>`, like `us-central1`,
/// `europe-west12`, `northamerica-northeast1`), not against a list: Google adds regions.
pub fn parse(s: &str) -> Result<String, String> {
    let t = s.trim();
    if let Some(m) = MULTI_REGIONS.iter().find(|m| m.eq_ignore_ascii_case(t)) {
        return Ok((*m).to_string());
    }
    let lower = t.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('-').collect();
    let word = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
    let last_ok = parts.last().is_some_and(|p| {
        let digits = p.trim_start_matches(|c: char| c.is_ascii_lowercase());
        digits.len() < p.len()
            && !digits.is_empty()
            && digits.len() <= 2
            && digits.bytes().all(|b| b.is_ascii_digit())
    });
    if parts.len() >= 2 && parts[..parts.len() - 1].iter().all(|p| word(p)) && last_ok {
        return Ok(lower);
    }
    Err(format!(
        "location {s:?} is not a BigQuery location: use a multi-region (US or EU) or a region \
         such as europe-west1 or us-central1"
    ))
}

/// Whether two locations as BigQuery reports them are the same (BigQuery is not consistent
/// about case: `EU`, `eu`, `europe-west1`).
pub fn same(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_regions_and_regions_in_bigquerys_spelling() {
        assert_eq!(parse("eu").unwrap(), "EU");
        assert_eq!(parse(" US ").unwrap(), "US");
        for r in [
            "europe-west1",
            "Europe-West3",
            "us-central1",
            "europe-west12",
            "northamerica-northeast1",
            "me-central2",
            "africa-south1",
        ] {
            assert_eq!(parse(r).unwrap(), r.to_ascii_lowercase(), "{r}");
        }
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for bad in [
            "",
            "europe",
            "west1",
            "europe-west",
            "europe-1",
            "europe-west123",
            "europe_west1",
            "eu-west1; drop",
            "us-central1/x",
            "ÉU",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("US or EU"),
                "{e}"
            );
        }
    }

    #[test]
    fn locations_compare_without_case() {
        assert!(same("EU", "eu"));
        assert!(same("europe-west1", "EUROPE-WEST1"));
        assert!(!same("EU", "europe-west1"));
    }
}
