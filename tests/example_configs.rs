//! Every config under examples/configs/ parses and validates, and its worker counts are what
//! its comments promise.

use std::path::PathBuf;

use tandem_protocol::config::DeploymentConfig;

fn load(name: &str) -> DeploymentConfig {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/configs")
        .join(name);
    let config = DeploymentConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        config.ignored_keys().is_empty(),
        "{name}: {:?}",
        config.ignored_keys()
    );
    config
}

#[test]
fn example_configs_parse_and_validate() {
    let disaggregated = load("cpu-disaggregated.yaml");
    assert_eq!(disaggregated.context_servers.instances(), 2);
    assert_eq!(disaggregated.generation_servers.instances(), 1);
    let aggregated = load("cpu-aggregated.yaml");
    assert_eq!(aggregated.context_servers.instances(), 0);
    assert_eq!(aggregated.generation_servers.instances(), 2);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") {
            load(&name);
        }
    }
}
