//! Compiles the C shim (csrc/shim.c) against the system UCX found with pkg-config, and links
//! libucp. See the crate doc for why a shim rather than Rust declarations of UCX's structs.

fn main() {
    // Probe twice: the shim's static library must come before libucp on the link line, so the
    // link flags are printed only after `compile` has printed the shim's.
    let probe = |emit_link_flags: bool| match pkg_config::Config::new()
        .atleast_version("1.10")
        .cargo_metadata(emit_link_flags)
        .probe("ucx")
    {
        Ok(lib) => lib,
        Err(err) => panic!(
            "tandem-ucx needs the system UCX (Debian: apt-get install libucx-dev); pkg-config: {err}"
        ),
    };
    let ucx = probe(false);
    let mut build = cc::Build::new();
    build
        .file("csrc/shim.c")
        .warnings(true)
        .extra_warnings(true);
    for include in &ucx.include_paths {
        build.include(include);
    }
    build.compile("tandem_ucx_shim");
    probe(true);
    println!("cargo:rerun-if-changed=csrc/shim.c");
}
