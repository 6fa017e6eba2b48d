//! A hub id without network access fails with an error that says what to do. (Its own test
//! binary: it sets process-wide environment variables.)

#[test]
fn hub_id_offline_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    // Safety: this test binary has one test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("HF_HOME", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let err = teamtune_llama::ModelFiles::resolve("meta-llama/Llama-3.1-8B-Instruct")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("meta-llama/Llama-3.1-8B-Instruct/config.json")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    // Online but unreachable: the download error says offline/gated and what else works.
    unsafe {
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    let err = teamtune_llama::ModelFiles::resolve("meta-llama/Llama-3.1-8B-Instruct")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot download") && err.contains("HF_TOKEN"),
        "{err}"
    );
}
