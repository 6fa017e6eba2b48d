//! Rendering: the grid as text for a terminal, and an episode as a PNG (or SVG) strip of grids,
//! one per round. Both show the ground truth (agents, items, targets, hidden targets): they are
//! for people, never for prompts.

use crate::episode::EpisodeRecord;
use crate::error::RenderError;
use crate::geom::Pos;
use crate::observe::fmt_score;
use crate::world::World;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos as Anchor, VPos};
use plotters::style::FontStyle;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Once;

/// DejaVu Sans (Bitstream Vera license, `assets/fonts/DejaVuSans-LICENSE.txt`).
pub const FONT_TTF: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

static FONT: Once = Once::new();

/// Registers the bundled font as plotters' `sans-serif` (no system fonts needed).
pub fn register_font() {
    FONT.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_TTF).is_err() {
            tracing::warn!("the bundled font could not be registered");
        }
    });
}

/// What a cell shows in text: agents' initials, items' ids, `+` target, `?` hidden target.
fn cell_text(world: &World, p: Pos) -> String {
    let mut s = String::new();
    for a in &world.agents {
        if a.pos == p {
            s.push(a.name.chars().next().unwrap_or('?'));
        }
    }
    for it in &world.items {
        if it.pos == Some(p) {
            s.push(it.id);
        }
    }
    if world.targets.contains(&p) {
        s.push('+');
    }
    if world.hidden.contains(&p) {
        s.push('?');
    }
    if s.is_empty() {
        s.push('.');
    }
    s
}

/// The grid as text, north at the top, with a legend of agents, holdings and items.
pub fn render_text(world: &World) -> String {
    let cells: Vec<Vec<String>> = (0..world.height)
        .map(|y| {
            (0..world.width)
                .map(|x| cell_text(world, Pos::new(x, y)))
                .collect()
        })
        .collect();
    let cw = cells
        .iter()
        .flatten()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(1)
        .max(world.width.saturating_sub(1).to_string().len());
    let label_w = (world.height - 1).max(0).to_string().len();
    let mut out = String::new();
    for y in (0..world.height).rev() {
        let _ = write!(out, "{y:>label_w$} |");
        for c in &cells[y as usize] {
            let _ = write!(out, " {c:<cw$}");
        }
        out.push('\n');
    }
    let _ = write!(out, "{:>label_w$} +", "");
    out.push_str(&"-".repeat((cw + 1) * world.width as usize));
    out.push('\n');
    let _ = write!(out, "{:>label_w$}  ", "");
    for x in 0..world.width {
        let _ = write!(out, " {x:<cw$}");
    }
    out.push('\n');
    let agents: Vec<String> = world
        .agents
        .iter()
        .map(|a| {
            let mut s = format!(
                "{}={} {}",
                a.name.chars().next().unwrap_or('?'),
                a.name,
                a.pos
            );
            if let Some(k) = a.holding {
                let _ = write!(s, " holds {}", world.items[k].id);
            }
            s
        })
        .collect();
    let _ = writeln!(out, "agents: {}", agents.join(", "));
    if !world.items.is_empty() {
        let items: Vec<String> = world
            .items
            .iter()
            .map(|it| {
                let mut s = match (it.pos, it.holder) {
                    (Some(p), _) => format!("{} {p}", it.id),
                    (None, Some(h)) => format!("{} held by {}", it.id, world.agents[h].name),
                    _ => format!("{} ?", it.id),
                };
                if let (true, Some(o)) = (world.permissions, it.owner) {
                    let _ = write!(s, " ({} only)", world.agents[o].name);
                }
                s
            })
            .collect();
        let _ = writeln!(out, "items: {}", items.join(", "));
    }
    if !world.targets.is_empty() {
        let t: Vec<String> = world.targets.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(out, "targets (+): {}", t.join(", "));
    }
    if !world.hidden.is_empty() {
        let t: Vec<String> = world.hidden.iter().map(|p| p.to_string()).collect();
        let _ = writeln!(out, "hidden targets (?): {}", t.join(", "));
    }
    let _ = write!(out, "score {}", fmt_score(world.score()));
    out
}

const CELL: i32 = 30;
const PAD: i32 = 8;
const TITLE: i32 = 20;
const PER_ROW: usize = 6;

const AGENT_COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn draw_err<E: std::fmt::Debug>(e: E) -> RenderError {
    RenderError::Draw(format!("{e:?}"))
}

fn draw_frame<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    world: &World,
) -> Result<(), RenderError> {
    let font = ("sans-serif", 13).into_font();
    area.draw(&Text::new(title.to_string(), (PAD, 3), font.clone()))
        .map_err(draw_err)?;
    let (w, h) = (world.width, world.height);
    // pixel of cell (x, y): north at the top
    let px = |x: i32, y: i32| (PAD + x * CELL, TITLE + (h - 1 - y) * CELL);
    for y in 0..h {
        for x in 0..w {
            let (x0, y0) = px(x, y);
            let p = Pos::new(x, y);
            let fill = if world.targets.contains(&p) {
                RGBColor(200, 240, 200)
            } else if world.hidden.contains(&p) {
                RGBColor(255, 240, 170)
            } else {
                WHITE
            };
            area.draw(&Rectangle::new(
                [(x0, y0), (x0 + CELL, y0 + CELL)],
                fill.filled(),
            ))
            .map_err(draw_err)?;
            area.draw(&Rectangle::new(
                [(x0, y0), (x0 + CELL, y0 + CELL)],
                RGBColor(160, 160, 160).stroke_width(1),
            ))
            .map_err(draw_err)?;
        }
    }
    for it in &world.items {
        if let Some(p) = it.pos {
            let (x0, y0) = px(p.x, p.y);
            // stacked items on one cell step to the right
            let k = world
                .items
                .iter()
                .take_while(|o| o.id != it.id)
                .filter(|o| o.pos == Some(p))
                .count() as i32;
            let (ix, iy) = (x0 + 2 + 13 * k, y0 + CELL - 14);
            area.draw(&Rectangle::new(
                [(ix, iy), (ix + 12, iy + 12)],
                RGBColor(170, 110, 40).filled(),
            ))
            .map_err(draw_err)?;
            area.draw(&Text::new(
                it.id.to_string(),
                (ix + 6, iy + 6),
                ("sans-serif", 11)
                    .into_font()
                    .color(&WHITE)
                    .pos(Anchor::new(HPos::Center, VPos::Center)),
            ))
            .map_err(draw_err)?;
        }
    }
    for (i, a) in world.agents.iter().enumerate() {
        let (x0, y0) = px(a.pos.x, a.pos.y);
        // several agents on one cell are offset a little
        let k = world.agents[..i].iter().filter(|b| b.pos == a.pos).count() as i32;
        let c = (x0 + CELL / 2 + 4 + 4 * k, y0 + CELL / 2 - 4 + 3 * k);
        let color = AGENT_COLORS[i % AGENT_COLORS.len()];
        area.draw(&Circle::new(c, 8, color.filled()))
            .map_err(draw_err)?;
        let initial = a.name.chars().next().unwrap_or('?').to_string();
        area.draw(&Text::new(
            initial,
            c,
            ("sans-serif", 12)
                .into_font()
                .color(&WHITE)
                .pos(Anchor::new(HPos::Center, VPos::Center)),
        ))
        .map_err(draw_err)?;
        if let Some(k) = a.holding {
            area.draw(&Text::new(
                world.items[k].id.to_string(),
                (c.0 + 7, c.1 - 12),
                ("sans-serif", 11)
                    .into_font()
                    .color(&RGBColor(170, 110, 40)),
            ))
            .map_err(draw_err)?;
        }
    }
    Ok(())
}

fn draw_frames<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    frames: &[(String, &World)],
) -> Result<(), RenderError> {
    root.fill(&WHITE).map_err(draw_err)?;
    let (fw, fh) = frame_size(frames);
    for (k, (title, world)) in frames.iter().enumerate() {
        let col = (k % PER_ROW) as i32;
        let row = (k / PER_ROW) as i32;
        let area = root
            .clone()
            .shrink((col * fw, row * fh), (fw as u32, fh as u32));
        draw_frame(&area, title, world)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

fn frame_size(frames: &[(String, &World)]) -> (i32, i32) {
    let w = frames.iter().map(|(_, f)| f.width).max().unwrap_or(1);
    let h = frames.iter().map(|(_, f)| f.height).max().unwrap_or(1);
    ((w * CELL + 2 * PAD).max(90), h * CELL + TITLE + PAD)
}

fn canvas(frames: &[(String, &World)]) -> (u32, u32) {
    let (fw, fh) = frame_size(frames);
    let cols = frames.len().min(PER_ROW) as i32;
    let rows = frames.len().div_ceil(PER_ROW) as i32;
    ((cols * fw) as u32, (rows * fh) as u32)
}

/// Draws titled world frames as a PNG (or SVG when the path ends in `.svg`), six per row.
pub fn render_frames(path: &Path, frames: &[(String, &World)]) -> Result<(), RenderError> {
    if frames.is_empty() {
        return Err(RenderError::Empty);
    }
    register_font();
    let size = canvas(frames);
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    if svg {
        draw_frames(SVGBackend::new(path, size).into_drawing_area(), frames)
    } else {
        draw_frames(BitMapBackend::new(path, size).into_drawing_area(), frames)
    }
}

/// Draws an episode: the start and the world after each round, with round and score.
pub fn render_snapshots(path: &Path, snapshots: &[(u32, World)]) -> Result<(), RenderError> {
    let frames: Vec<(String, &World)> = snapshots
        .iter()
        .map(|(r, w)| {
            let t = if *r == 0 {
                format!("start, score {}", fmt_score(w.score()))
            } else {
                format!("round {r}, score {}", fmt_score(w.score()))
            };
            (t, w)
        })
        .collect();
    render_frames(path, &frames)
}

/// Replays a record and draws it (see [`render_snapshots`]).
pub fn render_record(path: &Path, record: &EpisodeRecord) -> Result<(), RenderError> {
    let report = crate::episode::replay(record)
        .map_err(|e| RenderError::Draw(format!("replaying the record: {e}")))?;
    render_snapshots(path, report.episode.snapshots())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskSpec;

    #[test]
    fn text_grid_has_north_on_top_and_legend() {
        let spec = TaskSpec::builtin("single_pick").unwrap();
        let mut w = World::generate(&spec, 1).unwrap();
        w.width = 3;
        w.height = 3;
        w.agents[0].pos = Pos::new(0, 2);
        w.items[0].pos = Some(Pos::new(2, 0));
        w.targets = vec![Pos::new(1, 1)];
        let t = render_text(&w);
        let lines: Vec<&str> = t.lines().collect();
        let initial = w.agents[0].name.chars().next().unwrap();
        assert!(lines[0].starts_with("2 |"), "{t}");
        assert!(lines[0].contains(initial));
        assert!(lines[1].contains('+'));
        assert!(lines[2].starts_with("0 |") && lines[2].contains('a'));
        assert!(t.contains("items: a (2,0)"));
        assert!(t.ends_with("score 0"));
    }

    #[test]
    fn png_and_svg_of_an_episode() {
        let spec = TaskSpec::builtin("multi_pick").unwrap();
        let ep = crate::expert::play_expert(&spec, 5).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("ep.png");
        render_snapshots(&png, ep.snapshots()).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let svg = dir.path().join("ep.svg");
        render_record(&svg, &ep.record()).unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    }
}
