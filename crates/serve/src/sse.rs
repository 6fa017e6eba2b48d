//! The server-sent events of one streamed request: per choice, a first chunk with the role, one
//! per text delta and one with the finish reason (chunks of different choices interleave, each
//! naming its `index`); then, when `stream_options.include_usage` asks for it, a chunk of the
//! usage, and `data: [DONE]`. A reply that may be a function call
//! comes whole and goes out as tool-call deltas (the call's id and name, then its arguments).
//! Dropped when the client goes away, which drops the receiver and so ends the row's decode.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, FinishReason, ResponseMeta, Usage};
use crate::engine::Event;
use crate::error::ServeError;
use crate::routes::{choice_call_id, reply_message};
use crate::tools::Tools;

pub(crate) struct SseStream {
    rx: UnboundedReceiver<Event>,
    meta: ResponseMeta,
    /// With functions on offer the reply comes whole, then goes out as deltas.
    tools: Option<Arc<Tools>>,
    call_id: String,
    include_usage: bool,
    /// Choices still decoding, and the usage of those that ended.
    left: usize,
    usage: Vec<Usage>,
    /// Events made and not yet sent.
    queue: VecDeque<Bytes>,
    /// The reply ended: what is queued is all that is left.
    ended: bool,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl SseStream {
    pub(crate) fn new(
        rx: UnboundedReceiver<Event>,
        meta: ResponseMeta,
        tools: Option<Arc<Tools>>,
        call_id: String,
        n: usize,
        include_usage: bool,
    ) -> Self {
        let mut s = SseStream {
            rx,
            meta,
            tools,
            call_id,
            include_usage,
            left: n.max(1),
            usage: Vec::new(),
            queue: VecDeque::new(),
            ended: false,
        };
        for choice in 0..s.left {
            s.push(choice, json!({"role": "assistant", "content": ""}), None);
        }
        s
    }

    /// Queues a chunk; with the usage asked for, every chunk says `"usage": null` until the
    /// last one (OpenAI's form).
    fn push(&mut self, choice: usize, delta: Value, finish: Option<FinishReason>) {
        let usage = self.include_usage.then_some(None);
        let c = api::chunk(&self.meta, choice, delta, finish, usage);
        self.queue.push_back(sse(&c));
    }

    /// Queues the end of a choice's reply: what is left of it and the finish reason; after
    /// the last choice, the usage and [DONE].
    fn end(&mut self, choice: usize, text: String, finish: FinishReason, usage: Usage) {
        if let Some(tools) = self.tools.clone() {
            let call_id = choice_call_id(&self.call_id, choice);
            let (message, finish_as) = reply_message(&text, finish, Some(&tools), &call_id);
            match message["tool_calls"].as_array().and_then(|c| c.first()) {
                Some(call) => {
                    let function = &call["function"];
                    self.push(
                        choice,
                        json!({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                               "function": {"name": function["name"], "arguments": ""}}]}),
                        None,
                    );
                    self.push(
                        choice,
                        json!({"tool_calls": [{"index": 0,
                               "function": {"arguments": function["arguments"]}}]}),
                        None,
                    );
                }
                None if !text.is_empty() => self.push(choice, json!({"content": text}), None),
                None => {}
            }
            self.push(choice, json!({}), Some(finish_as));
        } else {
            self.push(choice, json!({}), Some(finish));
        }
        self.usage.push(usage);
        self.left = self.left.saturating_sub(1);
        if self.left > 0 {
            return;
        }
        if self.include_usage {
            let usage = Usage::of_choices(&self.usage);
            self.queue
                .push_back(sse(&api::usage_chunk(&self.meta, usage)));
        }
        self.close();
    }

    fn close(&mut self) {
        self.queue
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.ended = true;
    }
}

impl futures_core::Stream for SseStream {
    type Item = std::result::Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                // Text deltas come only for replies that are not held back for a call.
                Poll::Ready(Some(Event::Text { choice, text })) => {
                    this.push(choice, json!({"content": text}), None)
                }
                Poll::Ready(Some(Event::Done {
                    choice,
                    text,
                    finish,
                    usage,
                    ..
                })) => this.end(choice, text, finish, usage),
                Poll::Ready(Some(Event::Failed(e))) => {
                    this.queue.push_back(sse(&e.body()));
                    this.close();
                }
                Poll::Ready(None) => {
                    this.queue.push_back(sse(&ServeError::ShuttingDown.body()));
                    this.close();
                }
            }
        }
    }
}
