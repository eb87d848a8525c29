//! Records the git revision for `crisp_bridge_build_info{revision}`: `BUILD_REVISION` when
//! set (a Docker build without `.git`), else `git rev-parse`, else `unknown`. (Not named
//! `CRISP_BRIDGE_*`: cargo also sets it when running tests, and the bridge reads every
//! `CRISP_BRIDGE_*` variable as a config key.)

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let revision = std::env::var("BUILD_REVISION")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| {
            std::process::Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BRIDGE_GIT_REVISION={revision}");
}
