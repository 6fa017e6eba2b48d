//! `teamtune serve`: the model (and its adapters, by name) behind an OpenAI-compatible
//! chat-completions API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use teamtune_serve::{DefaultFormat, EngineConfig, ServeConfig, Server};

use super::model_args::{chat_template, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LoRA adapter (PEFT folder) served as model NAME: `--adapter NAME=DIR`, repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    pub adapter: Vec<String>,
    /// The base model's name in /v1/models and requests (default: the model file or folder's
    /// name, e.g. SmolLM2-135M-Instruct.Q4_1).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Address to bind; loopback by default (use 0.0.0.0 to serve other machines).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (or set TEAMTUNE_API_KEY).
    #[arg(long, env = "TEAMTUNE_API_KEY")]
    pub api_key: Option<String>,
    /// Most requests decoded together (1: one at a time).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Most requests waiting to be decoded; more are refused with 429 and Retry-After. A batch
    /// is made of waiting requests, so keep it at least --max-batch.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// Tokens of finished conversations whose KV caches are kept, per adapter, so that a
    /// request continuing one (an agent's next turn, a shared system prompt) runs only its new
    /// tokens; 0 keeps none. Memory: layers x 2 x KV heads x head dim x dtype bytes per token
    /// (SmolLM2 in f32: 46 KB).
    #[arg(long, default_value_t = 0)]
    pub prefix_cache_tokens: usize,
    /// Most prompt tokens a request joining the running batch feeds per decode step, so that a
    /// long prompt does not stall the replies already decoding (larger: faster prefill, longer
    /// pauses for the others).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Serve vLLM's `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and
    /// `POST /v1/unload_lora_adapter {"lora_name"}`. Clients may then make the server read
    /// any adapter folder it can reach: use with --api-key on a shared machine.
    #[arg(long)]
    pub allow_runtime_lora: bool,
    /// On SIGINT/SIGTERM, seconds the requests in flight may still run before they are
    /// cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// A JSON schema (an object) every reply follows when its request sends no
    /// `response_format`, for agent programs that parse JSON but never ask for it (llama-server's
    /// flag). A request's own `response_format` wins.
    #[arg(long, value_name = "JSON", conflicts_with = "json_schema_file")]
    pub json_schema: Option<String>,
    /// `--json-schema` read from a file.
    #[arg(long, value_name = "FILE")]
    pub json_schema_file: Option<PathBuf>,
    /// The same for one adapter, before the server-wide one: `--adapter-schema NAME=FILE`,
    /// repeatable.
    #[arg(long, value_name = "NAME=FILE")]
    pub adapter_schema: Vec<String>,
}

/// A schema given on the command line, parsed (not yet compiled: that needs the tokenizer).
fn schema_from(text: &str, source: String) -> anyhow::Result<DefaultFormat> {
    let schema: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{source}: not valid JSON: {e}"))?;
    if !schema.is_object() {
        bail!("{source}: a JSON schema must be an object, like {{\"type\": \"object\"}}");
    }
    Ok(DefaultFormat { schema, source })
}

fn schema_file(path: &Path, flag: &str) -> anyhow::Result<DefaultFormat> {
    let source = format!("{flag} {}", path.display());
    let text = teamtune_llama::read_text_file(path).with_context(|| source.clone())?;
    schema_from(&text, source)
}

/// The reply formats of requests that send none: server-wide and per adapter.
fn default_formats(
    args: &Args,
    adapters: &[(String, PathBuf)],
) -> anyhow::Result<(Option<DefaultFormat>, HashMap<String, DefaultFormat>)> {
    let default = match (&args.json_schema, &args.json_schema_file) {
        (Some(text), _) => Some(schema_from(text, "--json-schema".into())?),
        (None, Some(path)) => Some(schema_file(path, "--json-schema-file")?),
        (None, None) => None,
    };
    let mut by_adapter = HashMap::new();
    for spec in &args.adapter_schema {
        let Some((name, file)) = spec
            .split_once('=')
            .filter(|(n, f)| !n.is_empty() && !f.is_empty())
        else {
            bail!("--adapter-schema {spec:?}: expected NAME=FILE");
        };
        if !adapters.iter().any(|(a, _)| a == name) {
            bail!("--adapter-schema {spec:?}: no --adapter is named `{name}`");
        }
        let format = schema_file(Path::new(file), &format!("--adapter-schema {name}="))?;
        if by_adapter.insert(name.to_string(), format).is_some() {
            bail!("--adapter-schema {name}: the adapter is given twice");
        }
    }
    Ok((default, by_adapter))
}

fn parse_adapter(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    match spec.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => bail!("--adapter {spec:?}: expected NAME=DIR"),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // An empty key would look like authentication and let everyone in.
    if args.api_key.as_ref().is_some_and(|k| k.trim().is_empty()) {
        bail!(
            "--api-key (or TEAMTUNE_API_KEY) is empty: give a key, or leave both unset to \
             serve without one"
        );
    }
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    if !(args.shutdown_grace >= 0.0 && args.shutdown_grace.is_finite()) {
        bail!("--shutdown-grace must be a non-negative number of seconds");
    }
    if args.queue_size < args.max_batch {
        tracing::warn!(
            "--queue-size {} < --max-batch {}: a batch is made of waiting requests, so batches stay at most {} rows",
            args.queue_size,
            args.max_batch,
            args.queue_size.max(1)
        );
    }
    let adapters = args
        .adapter
        .iter()
        .map(|s| parse_adapter(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (default_format, adapter_formats) = default_formats(&args, &adapters)?;
    // Bound before the model loads: a taken port or a bad --host fails in a second.
    let listener =
        std::net::TcpListener::bind((args.host.as_str(), args.port)).with_context(|| {
            format!(
                "--host {} --port {}: cannot listen there",
                args.host, args.port
            )
        })?;
    listener.set_nonblocking(true)?;
    let (mut loaded, _) = args.model.load_for_inference()?;
    let template = chat_template(&loaded.assets)?;
    for (name, dir) in &adapters {
        if loaded.model.adapter(name).is_some() {
            bail!("--adapter {name}: the name is given twice");
        }
        loaded
            .model
            .load_adapter(name, dir)
            .with_context(|| format!("loading the adapter {name} from {}", dir.display()))?;
    }
    let model_name = match &args.served_model_name {
        Some(n) => n.clone(),
        None => {
            let described = loaded.files.describe();
            let path = std::path::Path::new(&described);
            let stem = if path.extension().is_some_and(|e| e == "gguf") {
                path.file_stem()
            } else {
                path.file_name()
            };
            stem.and_then(|s| s.to_str())
                .filter(|s| !s.is_empty())
                .unwrap_or("model")
                .to_string()
        }
    };
    let config = ServeConfig {
        model_name,
        engine: EngineConfig {
            max_batch: args.max_batch,
            queue_size: args.queue_size,
            prefix_cache_tokens: args.prefix_cache_tokens,
            prefill_chunk: args.prefill_chunk,
        },
        api_key: args.api_key.clone(),
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace),
        default_format,
        adapter_formats,
        allow_runtime_lora: args.allow_runtime_lora,
    };
    let server = Server::new(loaded.model, &loaded.assets, template, config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        tracing::info!(
            models = ?server.model_names(),
            max_batch = args.max_batch,
            queue_size = args.queue_size,
            auth = args.api_key.is_some(),
            "serving on http://{addr}/v1"
        );
        // The one line on stdout: where to send requests (useful with --port 0).
        println!("http://{addr}/v1");
        server.run(listener, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
