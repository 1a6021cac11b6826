//! Where the box runs, what it is called and in which region, worked out from the environment
//! the provider gives the container. Used for the defaults of `EMP_PROVIDER`,
//! `EMP_MACHINE_ID` and `EMP_REGION` (CONTRACT.md section 2); the variables always win.
//!
//! - SaladCloud sets `SALAD_MACHINE_ID`, `SALAD_CONTAINER_GROUP_ID`/`_NAME`,
//!   `SALAD_ORGANIZATION_NAME`, `SALAD_PROJECT_NAME`, `SALAD_INSTANCE_ID`… in every container.
//! - vast.ai sets `CONTAINER_ID` (the instance id) and `VAST_CONTAINERLABEL` (`C.<id>`).
//!
//! Neither provider documents a region variable today. The names in [`SALAD_REGION_VARS`] and
//! [`VASTAI_REGION_VARS`] are read when present (an image or a container-group spec can set
//! them alongside the provider's own); otherwise the region is `unknown` and operators set
//! `EMP_REGION` per deployment.

use crate::config::Environment;

/// `EMP_PROVIDER` for SaladCloud.
pub const SALAD: &str = "salad";
/// `EMP_PROVIDER` for vast.ai.
pub const VASTAI: &str = "vastai";
/// `EMP_PROVIDER` for anything else: a workstation, bare metal, a CI runner.
pub const LOCAL: &str = "local";

/// Region variables read on a SaladCloud box, first set wins.
pub const SALAD_REGION_VARS: &[&str] = &["SALAD_REGION", "SALAD_COUNTRY_CODE"];
/// Region variables read on a vast.ai box, first set wins.
pub const VASTAI_REGION_VARS: &[&str] = &["VAST_REGION", "VAST_GEOLOCATION"];

/// What the host itself says about its identity, read once at start. A separate input so tests
/// can describe any host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/etc/machine-id`, trimmed; `None` when absent, empty or systemd's `uninitialized`.
    pub machine_id_file: Option<String>,
    /// The hostname; `None` when the OS does not say.
    pub hostname: Option<String>,
}

impl HostFacts {
    /// Reads `/etc/machine-id` and the hostname. Never fails: missing facts are `None`.
    pub fn read() -> Self {
        let machine_id_file = std::fs::read_to_string("/etc/machine-id")
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|id| !id.is_empty() && id != "uninitialized");
        let hostname = sysinfo::System::host_name()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty());
        Self {
            machine_id_file,
            hostname,
        }
    }
}

/// The provider the environment points at: [`SALAD`] when any `SALAD_*` variable is set,
/// [`VASTAI`] when `VAST_CONTAINERLABEL` or `CONTAINER_ID` is, else [`LOCAL`].
pub fn detect_provider(env: &Environment) -> &'static str {
    if env.has_prefix("SALAD_") {
        SALAD
    } else if env.get("VAST_CONTAINERLABEL").is_some() || env.get("CONTAINER_ID").is_some() {
        VASTAI
    } else {
        LOCAL
    }
}

/// The box's external id: `SALAD_MACHINE_ID`, else vast.ai's `CONTAINER_ID`, else
/// `/etc/machine-id`, else the hostname. `None` when none of them is known.
pub fn detect_machine_id(env: &Environment, host: &HostFacts) -> Option<String> {
    env.get("SALAD_MACHINE_ID")
        .or_else(|| env.get("CONTAINER_ID"))
        .map(str::to_owned)
        .or_else(|| host.machine_id_file.clone())
        .or_else(|| host.hostname.clone())
}

/// The region the provider's environment gives for `provider`, if any.
pub fn detect_region(env: &Environment, provider: &str) -> Option<String> {
    let vars = match provider {
        SALAD => SALAD_REGION_VARS,
        VASTAI => VASTAI_REGION_VARS,
        _ => return None,
    };
    vars.iter().find_map(|var| env.get(var)).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().copied())
    }

    fn host(machine_id: Option<&str>, hostname: Option<&str>) -> HostFacts {
        HostFacts {
            machine_id_file: machine_id.map(str::to_owned),
            hostname: hostname.map(str::to_owned),
        }
    }

    #[test]
    fn provider_precedence() {
        assert_eq!(detect_provider(&env(&[])), LOCAL);
        assert_eq!(detect_provider(&env(&[("SALAD_PROJECT_NAME", "p")])), SALAD);
        assert_eq!(detect_provider(&env(&[("CONTAINER_ID", "42")])), VASTAI);
        assert_eq!(
            detect_provider(&env(&[("VAST_CONTAINERLABEL", "C.42")])),
            VASTAI
        );
        // Salad wins over a generic CONTAINER_ID; blank SALAD_ variables do not count.
        assert_eq!(
            detect_provider(&env(&[("CONTAINER_ID", "42"), ("SALAD_MACHINE_ID", "m")])),
            SALAD
        );
        assert_eq!(
            detect_provider(&env(&[("SALAD_MACHINE_ID", " "), ("HOME", "/root")])),
            LOCAL
        );
        // A name that merely contains SALAD is not Salad's.
        assert_eq!(detect_provider(&env(&[("MY_SALAD_THING", "x")])), LOCAL);
    }

    #[test]
    fn machine_id_precedence() {
        let h = host(Some("etc-machine-id"), Some("hostname"));
        assert_eq!(
            detect_machine_id(
                &env(&[("SALAD_MACHINE_ID", "salad"), ("CONTAINER_ID", "vast")]),
                &h
            )
            .as_deref(),
            Some("salad")
        );
        assert_eq!(
            detect_machine_id(&env(&[("CONTAINER_ID", "vast")]), &h).as_deref(),
            Some("vast")
        );
        assert_eq!(
            detect_machine_id(&env(&[]), &h).as_deref(),
            Some("etc-machine-id")
        );
        assert_eq!(
            detect_machine_id(&env(&[]), &host(None, Some("hostname"))).as_deref(),
            Some("hostname")
        );
        assert_eq!(detect_machine_id(&env(&[]), &host(None, None)), None);
    }

    #[test]
    fn region_comes_from_the_providers_own_variables() {
        let salad = env(&[("SALAD_COUNTRY_CODE", "us"), ("VAST_REGION", "eu")]);
        assert_eq!(detect_region(&salad, SALAD).as_deref(), Some("us"));
        assert_eq!(detect_region(&salad, VASTAI).as_deref(), Some("eu"));
        assert_eq!(detect_region(&salad, LOCAL), None);
        let both = env(&[("SALAD_REGION", "us-east"), ("SALAD_COUNTRY_CODE", "us")]);
        assert_eq!(detect_region(&both, SALAD).as_deref(), Some("us-east"));
        assert_eq!(
            detect_region(&env(&[("VAST_GEOLOCATION", "Texas, US")]), VASTAI).as_deref(),
            Some("Texas, US")
        );
        assert_eq!(detect_region(&env(&[]), SALAD), None);
    }

    #[test]
    fn reading_the_real_host_never_fails() {
        let facts = HostFacts::read();
        if let Some(id) = &facts.machine_id_file {
            assert!(!id.is_empty());
        }
    }
}
