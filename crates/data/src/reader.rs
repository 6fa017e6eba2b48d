//! Streaming JSON Lines reader: files, folders of files, gzip-compressed files.
//!
//! Reads one line at a time, so files of any size stream through a small buffer. A line that is
//! not a valid conversation is an error naming file, line and field; with
//! [`ReadOptions::skip_invalid`] it is counted in the [`ReadReport`] instead (the first few are
//! kept with their reasons) and reading goes on. Blank lines are ignored and counted.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::conversation::{Conversation, Source};
use crate::error::{DataError, InvalidRecord, Result};

/// How many invalid records a report keeps with their reasons (all are counted).
pub const MAX_REPORTED_INVALID: usize = 20;

/// The longest line read by default: a trajectory of 12k tokens is ~50 KB; an endless stream
/// (`/dev/zero`, a file without newlines) must not fill the memory.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Count and skip invalid records instead of failing on the first one.
    pub skip_invalid: bool,
    /// A longer line is an error naming the file and line (not skipped: it is not a record).
    pub max_line_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            skip_invalid: false,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// What reading saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadReport {
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// Lines read, blank ones included.
    pub lines: u64,
    pub blank_lines: u64,
    /// Valid conversations returned.
    pub conversations: u64,
    /// Invalid records skipped (only with `skip_invalid`).
    pub invalid: u64,
    /// The first [`MAX_REPORTED_INVALID`] invalid records with their reasons.
    pub invalid_examples: Vec<InvalidRecord>,
}

impl ReadReport {
    /// Merges another report into this one.
    pub fn merge(&mut self, other: ReadReport) {
        self.files.extend(other.files);
        self.lines += other.lines;
        self.blank_lines += other.blank_lines;
        self.conversations += other.conversations;
        self.invalid += other.invalid;
        for e in other.invalid_examples {
            if self.invalid_examples.len() < MAX_REPORTED_INVALID {
                self.invalid_examples.push(e);
            }
        }
    }
}

fn is_conversation_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".jsonl") || name.ends_with(".jsonl.gz")
}

fn io_err(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        error: source,
    }
}

/// Expands the given paths into the list of files to read: a file is taken as it is (whatever its
/// name); a folder contributes its `*.jsonl` and `*.jsonl.gz` files, recursively, in sorted order.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| io_err(p, e))?;
        if meta.is_dir() {
            let before = out.len();
            walk(p, &mut out, &mut seen)?;
            if out.len() == before {
                return Err(DataError::NoFiles(p.clone()));
            }
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// `seen`: the folders already walked (their real paths), so that a symlink loop, or a link to
/// a folder also given, is read once.
fn walk(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    seen: &mut std::collections::HashSet<PathBuf>,
) -> Result<()> {
    let real = std::fs::canonicalize(dir).map_err(|e| io_err(dir, e))?;
    if !seen.insert(real) {
        tracing::debug!(dir = %dir.display(), "already read (a symlink to a folder read before)");
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| io_err(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out, seen)?;
        } else if is_conversation_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Opens a file for line reading, decompressing it when it starts with the gzip magic bytes.
fn open(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut magic = [0u8; 2];
    let mut n = 0;
    while n < 2 {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(path, e)),
        }
    }
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let chained = head.chain(f);
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            MultiGzDecoder::new(chained),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, chained)))
    }
}

/// Parses one line into a conversation, or says what is wrong with it.
pub fn parse_line(
    bytes: &[u8],
    source: Source,
) -> std::result::Result<Conversation, InvalidRecord> {
    let invalid = |field: Option<String>, message: String| InvalidRecord {
        file: source.file.to_path_buf(),
        line: source.line,
        field,
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        invalid(
            None,
            format!("not valid UTF-8 (bad byte at offset {})", e.valid_up_to()),
        )
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(None, format!("not valid JSON: {e}")))?;
    Conversation::from_json(value, source.clone()).map_err(|e| invalid(e.field, e.message))
}

/// An iterator over the conversations of several files, read one line at a time.
pub struct ConversationReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, Box<dyn BufRead + Send>, u64)>,
    options: ReadOptions,
    report: ReadReport,
    buf: Vec<u8>,
    failed: bool,
}

impl ConversationReader {
    /// Opens the given files and folders (see [`discover`]).
    pub fn open(paths: &[PathBuf], options: ReadOptions) -> Result<Self> {
        let files = discover(paths)?;
        Ok(ConversationReader {
            files: files.into_iter(),
            current: None,
            options,
            report: ReadReport::default(),
            buf: Vec::with_capacity(1 << 12),
            failed: false,
        })
    }

    /// What has been read so far.
    pub fn report(&self) -> &ReadReport {
        &self.report
    }

    pub fn into_report(self) -> ReadReport {
        self.report
    }

    fn next_inner(&mut self) -> Option<Result<Conversation>> {
        loop {
            if self.current.is_none() {
                let path = self.files.next()?;
                match open(&path) {
                    Ok(r) => {
                        self.report.files.push(path.clone());
                        self.current = Some((path, r, 0));
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
            let (path, reader, line) = self.current.as_mut().expect("set above");
            self.buf.clear();
            let limit = self.options.max_line_bytes;
            match (&mut *reader)
                .take(limit as u64 + 1)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(0) => {
                    self.current = None;
                    continue;
                }
                Ok(n) if n > limit && !self.buf.ends_with(b"\n") => {
                    let msg = format!(
                        "line {} is longer than {} MiB, the longest line read (the data \
                         commands' --max-line-mb raises it)",
                        *line + 1,
                        limit >> 20
                    );
                    return Some(Err(io_err(
                        path,
                        std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    let msg = format!("after line {line}: {e}");
                    return Some(Err(io_err(path, std::io::Error::new(e.kind(), msg))));
                }
            }
            *line += 1;
            self.report.lines += 1;
            let mut bytes = &self.buf[..];
            if *line == 1 && bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
                bytes = &bytes[3..]; // UTF-8 byte order mark
            }
            while let Some((&last, rest)) = bytes.split_last() {
                if last == b'\n' || last == b'\r' {
                    bytes = rest;
                } else {
                    break;
                }
            }
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                self.report.blank_lines += 1;
                continue;
            }
            let source = Source::new(path.clone(), *line);
            match parse_line(bytes, source) {
                Ok(c) => {
                    self.report.conversations += 1;
                    return Some(Ok(c));
                }
                Err(e) if self.options.skip_invalid => {
                    self.report.invalid += 1;
                    tracing::debug!("skipping {e}");
                    if self.report.invalid_examples.len() < MAX_REPORTED_INVALID {
                        self.report.invalid_examples.push(e);
                    }
                }
                Err(e) => return Some(Err(DataError::Invalid(e))),
            }
        }
    }
}

impl Iterator for ConversationReader {
    type Item = Result<Conversation>;

    /// The next conversation; after an error, `None`.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.next_inner();
        if matches!(r, Some(Err(_))) {
            self.failed = true;
        }
        r
    }
}

/// Reads every conversation of the given files and folders.
pub fn read_conversations(
    paths: &[PathBuf],
    options: &ReadOptions,
) -> Result<(Vec<Conversation>, ReadReport)> {
    let mut reader = ConversationReader::open(paths, options.clone())?;
    let mut out = Vec::new();
    for c in reader.by_ref() {
        out.push(c?);
    }
    Ok((out, reader.into_report()))
}
