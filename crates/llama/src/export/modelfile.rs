//! An Ollama `Modelfile` beside an exported model or adapter, so that `ollama create NAME -f
//! Modelfile` works unchanged: `FROM` the base, `ADAPTER` the LoRA GGUF, a `TEMPLATE` in
//! Ollama's Go template syntax equivalent to the chat template, and a `PARAMETER stop` per
//! end-of-turn token.

use std::path::Path;

/// The chat formats whose Go template is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (LLaMA-3.x).
    Llama3,
    /// Another template: Ollama falls back to the one in the GGUF, if it knows it.
    Other,
}

/// What the `Modelfile` says.
pub struct Modelfile<'a> {
    /// `FROM`: the base model (a GGUF file or a safetensors folder).
    pub from: &'a Path,
    /// `ADAPTER`: the LoRA GGUF, if any.
    pub adapter: Option<&'a Path>,
    pub format: ChatFormat,
    /// End-of-turn tokens (`PARAMETER stop`).
    pub stops: &'a [String],
}

/// Ollama quotes with `"""`; paths with spaces need quoting too.
fn quoted(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains(char::is_whitespace) {
        format!("\"{s}\"")
    } else {
        s
    }
}

impl Modelfile<'_> {
    pub fn render(&self) -> String {
        let mut out =
            String::from("# Made by `teamtune export`: ollama create NAME -f THIS_FILE\n");
        out.push_str(&format!("FROM {}\n", quoted(self.from)));
        if let Some(a) = self.adapter {
            out.push_str(&format!("ADAPTER {}\n", quoted(a)));
        }
        match self.format {
            ChatFormat::ChatMl => out.push_str(
                "TEMPLATE \"\"\"{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\"\n",
            ),
            ChatFormat::Llama3 => out.push_str(
                "TEMPLATE \"\"\"<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n\"\"\"\n",
            ),
            ChatFormat::Other => out.push_str(
                "# No TEMPLATE: the chat template is not ChatML or LLaMA-3; Ollama uses the GGUF's own.\n",
            ),
        }
        for s in self.stops {
            out.push_str(&format!("PARAMETER stop \"{}\"\n", s.replace('"', "\\\"")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_and_llama3_templates_and_stops() {
        let stops = ["<|im_end|>".to_string()];
        let m = Modelfile {
            from: Path::new("/models/base.gguf"),
            adapter: Some(Path::new("/runs/my run/adapter.gguf")),
            format: ChatFormat::ChatMl,
            stops: &stops,
        }
        .render();
        assert!(m.contains("\nFROM /models/base.gguf\n"), "{m}");
        assert!(
            m.contains("\nADAPTER \"/runs/my run/adapter.gguf\"\n"),
            "{m}"
        );
        assert!(m.contains("<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n\"\"\""), "{m}");
        assert!(m.ends_with("PARAMETER stop \"<|im_end|>\"\n"), "{m}");
        let stops = ["<|eot_id|>".to_string(), "<|end_of_text|>".to_string()];
        let m = Modelfile {
            from: Path::new("/m"),
            adapter: None,
            format: ChatFormat::Llama3,
            stops: &stops,
        }
        .render();
        assert!(!m.contains("ADAPTER"));
        assert!(
            m.contains(
                "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
            ),
            "{m}"
        );
        assert_eq!(m.matches("PARAMETER stop").count(), 2);
    }
}
