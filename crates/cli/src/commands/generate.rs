//! `teamtune generate`: one answer from a model, streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use teamtune_data::Message;
use teamtune_llama::{generate, StopReason, TextStream};

use super::adapter_args::{check_adapter, load_with_adapter};
use super::model_args::{chat_template, ModelArgs};
use super::sampling_args::SamplingArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message (or, with --raw, the whole prompt text).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A system message placed before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// A JSON file holding a list of chat messages ({"role", "content"}) for multi-turn
    /// prompts.
    #[arg(long, conflicts_with = "raw")]
    pub messages: Option<PathBuf>,
    /// Feed --prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A LoRA adapter folder (PEFT format, e.g. a `teamtune train` run's adapter) to answer
    /// with.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Arguments and the messages file are checked before the model loads.
    args.sampling.check()?;
    if let Some(dir) = &args.adapter {
        check_adapter(dir)?;
    }
    let raw_prompt = if args.raw {
        Some(args.prompt.clone().context("--raw needs --prompt")?)
    } else {
        None
    };
    let mut messages: Vec<Message> = match (&args.messages, args.raw) {
        (Some(path), false) => read_messages(path)?,
        _ => Vec::new(),
    };
    if !args.raw {
        if let Some(system) = &args.system {
            messages.insert(0, Message::system(system.clone()));
        }
        if let Some(prompt) = &args.prompt {
            messages.push(Message::user(prompt.clone()));
        }
        if messages.is_empty() {
            bail!("nothing to answer: give --prompt or --messages");
        }
    }
    let loaded = load_with_adapter(&args.model, args.adapter.as_deref())?;
    let prompt_text = match raw_prompt {
        Some(text) => text,
        None => chat_template(&loaded.assets)?.render(&messages, true)?,
    };
    // The template already wrote BOS and the special tokens: do not add them again.
    let prompt = loaded.assets.encode(&prompt_text, args.raw)?;
    tracing::debug!(tokens = prompt.len(), "prompt");
    let params = args.sampling.params();
    let mut stream = TextStream::new(&loaded.assets.tokenizer);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let started = std::time::Instant::now();
    let out = generate(
        &loaded.model,
        &prompt,
        &params,
        args.sampling.max_tokens,
        &loaded.assets.eos_token_ids,
        |tok| match stream.push(tok) {
            Ok(Some(piece)) => {
                if let Err(e) = stdout
                    .write_all(piece.as_bytes())
                    .and_then(|_| stdout.flush())
                {
                    write_error = Some(anyhow::Error::from(e));
                    return false;
                }
                true
            }
            Ok(None) => true,
            Err(e) => {
                write_error = Some(e.into());
                false
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e);
    }
    if let Some(rest) = stream.finish()? {
        stdout.write_all(rest.as_bytes())?;
    }
    writeln!(stdout)?;
    let secs = started.elapsed().as_secs_f64();
    let reason = match out.stop {
        StopReason::Eos(_) => "end of turn",
        StopReason::MaxTokens => "max tokens",
        StopReason::Callback => "stopped",
    };
    tracing::info!(
        prompt_tokens = prompt.len(),
        new_tokens = out.tokens.len(),
        tokens_per_s = format!("{:.1}", out.tokens.len() as f64 / secs),
        stop = reason,
        "done"
    );
    Ok(())
}

pub fn read_messages(path: &std::path::Path) -> anyhow::Result<Vec<Message>> {
    let text = teamtune_llama::read_text_file(path)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let items = value
        .as_array()
        .with_context(|| format!("{}: expected a JSON list of messages", path.display()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(|r| r.as_str());
            let content = m.get("content").and_then(|c| c.as_str());
            match (role.and_then(teamtune_data::Role::parse), content) {
                (Some(role), Some(content)) => Ok(Message::new(role, content)),
                _ => bail!(
                    "{}: message {i} needs a \"role\" (system, user, assistant, tool) and a string \"content\"",
                    path.display()
                ),
            }
        })
        .collect()
}
