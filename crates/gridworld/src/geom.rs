//! Positions and directions. `(0, 0)` is the south-west corner; north is `y + 1`, east is `x + 1`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A cell `(x, y)`. Serialised as `[x, y]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "(i32, i32)", into = "(i32, i32)")]
pub struct Pos {
    pub x: i32,
    pub y: i32,
}

impl Pos {
    pub const fn new(x: i32, y: i32) -> Self {
        Pos { x, y }
    }

    /// Manhattan distance.
    pub fn dist(self, other: Pos) -> u32 {
        self.x.abs_diff(other.x) + self.y.abs_diff(other.y)
    }

    pub fn step(self, dir: Dir) -> Pos {
        let (dx, dy) = dir.delta();
        Pos::new(self.x + dx, self.y + dy)
    }

    /// The way from `self` to `to` in moves, east/west first (the order experts move in):
    /// `2 east, 3 north`, `1 west`, `here`. Observations print it beside every goal cell so
    /// that choosing a move is reading the first direction, not comparing numbers: a 135M
    /// model copies reliably but compares coordinates right about a third of the time
    /// (README, the audit of the 2026-12-02 demo).
    pub fn way_to(self, to: Pos) -> String {
        let mut parts = Vec::new();
        match to.x - self.x {
            0 => {}
            dx if dx > 0 => parts.push(format!("{dx} east")),
            dx => parts.push(format!("{} west", -dx)),
        }
        match to.y - self.y {
            0 => {}
            dy if dy > 0 => parts.push(format!("{dy} north")),
            dy => parts.push(format!("{} south", -dy)),
        }
        if parts.is_empty() {
            "here".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// Parses every `(x,y)` (spaces allowed) in a text, in order.
    pub fn find_all(text: &str) -> Vec<Pos> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('(') {
            rest = &rest[open + 1..];
            let Some(close) = rest.find(')') else { break };
            let inner = &rest[..close];
            if let Some((a, b)) = inner.split_once(',') {
                if let (Ok(x), Ok(y)) = (a.trim().parse::<i32>(), b.trim().parse::<i32>()) {
                    out.push(Pos::new(x, y));
                }
            }
        }
        out
    }
}

impl From<(i32, i32)> for Pos {
    fn from((x, y): (i32, i32)) -> Self {
        Pos { x, y }
    }
}

impl From<Pos> for (i32, i32) {
    fn from(p: Pos) -> Self {
        (p.x, p.y)
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({},{})", self.x, self.y)
    }
}

/// A compass move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    North,
    South,
    East,
    West,
}

impl Dir {
    pub const ALL: [Dir; 4] = [Dir::North, Dir::South, Dir::East, Dir::West];

    pub fn delta(self) -> (i32, i32) {
        match self {
            Dir::North => (0, 1),
            Dir::South => (0, -1),
            Dir::East => (1, 0),
            Dir::West => (-1, 0),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dir::North => "north",
            Dir::South => "south",
            Dir::East => "east",
            Dir::West => "west",
        }
    }
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn way_to_names_east_west_first_and_agrees_with_steps() {
        assert_eq!(Pos::new(1, 1).way_to(Pos::new(3, 4)), "2 east, 3 north");
        assert_eq!(Pos::new(3, 5).way_to(Pos::new(3, 4)), "1 south");
        assert_eq!(Pos::new(4, 0).way_to(Pos::new(0, 2)), "4 west, 2 north");
        assert_eq!(Pos::new(2, 2).way_to(Pos::new(2, 2)), "here");
        // walking the stated ways one step at a time arrives
        for (from, to) in [((0, 0), (4, 3)), ((5, 5), (0, 1)), ((2, 4), (2, 0))] {
            let (mut at, to) = (Pos::from(from), Pos::from(to));
            for _ in 0..at.dist(to) {
                let way = at.way_to(to);
                let first = way.split(", ").next().unwrap();
                let dir = match first.rsplit(' ').next().unwrap() {
                    "east" => Dir::East,
                    "west" => Dir::West,
                    "north" => Dir::North,
                    "south" => Dir::South,
                    other => panic!("{other}"),
                };
                at = at.step(dir);
            }
            assert_eq!(at.way_to(to), "here");
        }
    }

    #[test]
    fn find_all_positions() {
        assert_eq!(
            Pos::find_all("I take corner (0,5). Also ( 3 , 4 ) and (a,b) (7,"),
            vec![Pos::new(0, 5), Pos::new(3, 4)]
        );
    }

    #[test]
    fn serde_as_pair() {
        let s = serde_json::to_string(&Pos::new(2, 3)).unwrap();
        assert_eq!(s, "[2,3]");
        assert_eq!(
            serde_json::from_str::<Pos>("[2,3]").unwrap(),
            Pos::new(2, 3)
        );
    }
}
