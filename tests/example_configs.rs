//! Every config under examples/configs/ parses and validates, and its worker counts and
//! devices are what its comments promise.

use std::path::PathBuf;

use tandem_protocol::config::{DeploymentConfig, ServerGroupConfig};

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

/// The device of every instance of a group.
fn devices(group: &ServerGroupConfig) -> Vec<String> {
    (0..group.instances())
        .map(|i| group.device_of(i).to_string())
        .collect()
}

/// The group's KV share of free GPU memory (the worker's default, 0.9, when unset).
fn fraction(group: &ServerGroupConfig) -> f64 {
    group
        .kv_cache_config
        .free_gpu_memory_fraction
        .unwrap_or(0.9)
}

#[test]
fn example_configs_parse_and_validate() {
    let disaggregated = load("cpu-disaggregated.yaml");
    assert_eq!(disaggregated.context_servers.instances(), 2);
    assert_eq!(disaggregated.generation_servers.instances(), 1);
    let aggregated = load("cpu-aggregated.yaml");
    assert_eq!(aggregated.context_servers.instances(), 0);
    assert_eq!(aggregated.generation_servers.instances(), 2);

    // One GPU: context and decode share cuda:0, their KV shares adding up to well under 1
    // (both may size their cache from the same free memory).
    let one_gpu = load("gpu-1.yaml");
    assert_eq!(devices(&one_gpu.context_servers), ["cuda:0"]);
    assert_eq!(devices(&one_gpu.generation_servers), ["cuda:0"]);
    let shares = fraction(&one_gpu.context_servers) + fraction(&one_gpu.generation_servers);
    assert!(shares <= 0.85, "gpu-1.yaml: KV shares add up to {shares}");
    // Under MPS the context worker is capped, so prefills cannot crowd out decode steps.
    assert_eq!(one_gpu.context_servers.mps_sm_percent, Some(80));
    assert_eq!(one_gpu.generation_servers.mps_sm_percent, None);

    // A reasoning model on one GPU: one aggregated worker, the thinking split out.
    let qwen3 = load("gpu-1-qwen3.yaml");
    assert_eq!(qwen3.context_servers.instances(), 0);
    assert_eq!(devices(&qwen3.generation_servers), ["cuda:0"]);
    assert_eq!(
        qwen3.reasoning_parser,
        Some(tandem_protocol::config::ReasoningParser::Qwen3)
    );

    // Two GPUs: one each.
    let two_gpus = load("gpu-2.yaml");
    assert_eq!(devices(&two_gpus.context_servers), ["cuda:0"]);
    assert_eq!(devices(&two_gpus.generation_servers), ["cuda:1"]);
    assert!(fraction(&two_gpus.context_servers) <= 0.95);
    assert!(fraction(&two_gpus.generation_servers) <= 0.95);

    // Two GPUs, one worker split over both.
    let split = load("gpu-2-tp.yaml");
    assert_eq!(split.context_servers.instances(), 0);
    assert_eq!(split.generation_servers.instances(), 1);
    assert_eq!(devices(&split.generation_servers), ["cuda:0"]);
    assert_eq!(split.generation_servers.tensor_parallel_size, Some(2));

    // Several hosts: a shared NATS server, the API on every interface, one worker per GPU on
    // each host, a model path every host can mount, a name for the subjects.
    let hosts = load("multi-host.yaml");
    let nats = hosts
        .nats
        .url
        .as_deref()
        .expect("multi-host.yaml names its NATS server");
    // Over TLS: a bus between hosts carries prompts and tokens (docs/security.md).
    assert!(
        nats.starts_with("tls://") && !nats.contains("127.0.0.1"),
        "{nats}"
    );
    assert_eq!(hosts.hostname, "0.0.0.0");
    assert!(hosts.model.as_deref().is_some_and(|m| m.starts_with('/')));
    assert!(hosts.served_model_name.is_some());
    for group in [&hosts.context_servers, &hosts.generation_servers] {
        let devices = devices(group);
        assert_eq!(devices, ["cuda:0", "cuda:1"]);
    }
    // Its comments show the `--only` commands each host runs.
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/configs/multi-host.yaml"),
    )
    .unwrap();
    // The workers of every host share one KV secret file.
    assert_eq!(
        hosts.kv_secret_file.as_deref(),
        Some("/etc/tandem/kv-secret")
    );
    // And it points to the least-privilege NATS users, credentials in the environment.
    for needle in [
        "examples/nats/permissions.conf",
        "TANDEM_NATS_PASSWORD_FILE",
        "openssl rand -hex 32 > /etc/tandem/kv-secret",
    ] {
        assert!(text.contains(needle), "multi-host.yaml mentions {needle}");
    }
    for part in ["api-server", "context", "generation"] {
        assert!(
            text.contains(&format!("tandem serve -c multi-host.yaml --only {part}")),
            "{part}"
        );
    }

    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") {
            load(&name);
        }
    }
}
