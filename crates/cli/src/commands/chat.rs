//! `teamtune chat`: a conversation with a model (and optionally an adapter) in the terminal.
//!
//! Each line read from stdin is a user turn; the answer streams to stdout. The conversation's
//! KV cache is kept between turns, so a turn runs only its new tokens. Lines starting with `/`
//! are commands: `/reset`, `/save FILE`, `/help`, `/quit`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use teamtune_data::Message;
use teamtune_guide::{prompt_tokens, reuse_prefix};
use teamtune_llama::{Session, TextStream, TokenFilter};

use super::adapter_args::{check_adapter, load_with_adapter};
use super::model_args::{chat_template, ModelArgs};
use super::sampling_args::SamplingArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LoRA adapter folder (PEFT format) to answer with.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// A system message at the start of the conversation (kept by /reset).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "commands: /reset (forget the conversation), /save FILE (write it as a JSON \
list of messages, the form `teamtune generate --messages` reads), /help, /quit";

pub fn run(args: Args) -> anyhow::Result<()> {
    args.sampling.check()?;
    if let Some(dir) = &args.adapter {
        check_adapter(dir)?;
    }
    let loaded = load_with_adapter(&args.model, args.adapter.as_deref())?;
    let template = chat_template(&loaded.assets)?;
    let model = &loaded.model;
    let context = model.config().max_position_embeddings;
    let start: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::system(s.clone()))
        .collect();
    let mut messages = start.clone();
    let mut session = Session::new(model);
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("{HELP}");
    }
    let mut stdout = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        let line = line.trim();
        if let Some(command) = line.strip_prefix('/') {
            let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    messages = start.clone();
                    session = Session::new(model);
                    eprintln!("(the conversation starts again)");
                }
                "save" => match save(Path::new(rest.trim()), &messages) {
                    Ok(path) => {
                        eprintln!("(saved {} messages to {})", messages.len(), path.display())
                    }
                    Err(e) => eprintln!("(not saved: {e:#})"),
                },
                "help" => eprintln!("{HELP}"),
                other => eprintln!("(unknown command /{other}; {HELP})"),
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        messages.push(Message::user(line));
        let prompt = prompt_tokens(&template, &loaded.assets.tokenizer, &messages)?;
        if prompt.len() + args.sampling.max_tokens > context {
            messages.pop();
            eprintln!(
                "(the conversation would pass the model's {context}-token context: /reset to start again)"
            );
            continue;
        }
        reuse_prefix(&mut session, &prompt)?;
        let mut printer = Printer {
            stream: TextStream::new(&loaded.assets.tokenizer),
            stop_ids: &loaded.assets.eos_token_ids,
            text: String::new(),
            out: &mut stdout,
            error: None,
        };
        session.decode(
            model,
            &mut printer,
            &args.sampling.params(),
            args.sampling.max_tokens,
            &loaded.assets.eos_token_ids,
        )?;
        if let Some(e) = printer.error.take() {
            return Err(e);
        }
        if let Some(rest) = printer.stream.finish()? {
            printer.text.push_str(&rest);
            printer.out.write_all(rest.as_bytes())?;
        }
        let reply = std::mem::take(&mut printer.text);
        writeln!(stdout)?;
        stdout.flush()?;
        messages.push(Message::assistant(reply));
    }
    Ok(())
}

/// Writes the conversation to a new file (never over an existing one), whole or not at all.
fn save(path: &Path, messages: &[Message]) -> anyhow::Result<PathBuf> {
    if path.as_os_str().is_empty() {
        bail!("give a file: /save FILE");
    }
    if path.exists() {
        bail!("{} exists; give a new file", path.display());
    }
    let json =
        serde_json::to_string_pretty(&messages.iter().map(Message::to_json).collect::<Vec<_>>())?;
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, json + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Streams the answer's text to stdout as it is decoded, and keeps it.
struct Printer<'a, W: Write> {
    stream: TextStream<'a>,
    stop_ids: &'a [u32],
    text: String,
    out: &'a mut W,
    error: Option<anyhow::Error>,
}

impl<W: Write> TokenFilter for Printer<'_, W> {
    fn forced(&mut self) -> Vec<u32> {
        Vec::new()
    }

    fn mask(&mut self, _logits: &mut [f32]) -> teamtune_llama::Result<()> {
        Ok(())
    }

    fn commit(&mut self, token: u32) -> teamtune_llama::Result<()> {
        if self.stop_ids.contains(&token) {
            return Ok(());
        }
        if let Some(piece) = self.stream.push(token)? {
            self.text.push_str(&piece);
            if let Err(e) = self
                .out
                .write_all(piece.as_bytes())
                .and_then(|_| self.out.flush())
            {
                self.error = Some(e.into());
            }
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        // stdout closed (e.g. piped into `head`): stop decoding.
        self.error.is_some()
    }
}
