//! Published results to compare evaluations against (`teamtune compare EVAL... --reference
//! study`): columns of per-task scores that are data, not measurements of ours.

/// One published column: a name and a score (0..100) per task, tasks in the published order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceColumn {
    pub name: &'static str,
    pub scores: &'static [(&'static str, f64)],
}

impl ReferenceColumn {
    /// The published score of `task`, if the column has one.
    pub fn score(&self, task: &str) -> Option<f64> {
        self.scores
            .iter()
            .find(|(t, _)| *t == task)
            .map(|&(_, s)| s)
    }
}

/// The study the grid-world reproduces: its results table, score per task as the mean of 10
/// runs, for the base Llama-3 8B, the base 70B and the 8B fine-tuned on trajectories.
/// Source: the project's grid-world specification, `GRIDWORLD.md`, section
/// "Results to reproduce (score, mean of 10 runs)". The only copy of these numbers in the code.
pub const STUDY: [ReferenceColumn; 3] = [
    ReferenceColumn {
        name: "study: base 8B",
        scores: &[
            ("single_nav", 80.0),
            ("corners", 37.5),
            ("alphabetical", 7.5),
            ("random_points", 45.0),
            ("single_pick", 20.0),
            ("multi_pick", 2.5),
            ("permission_pick", 3.3),
        ],
    },
    ReferenceColumn {
        name: "study: base 70B",
        scores: &[
            ("single_nav", 90.0),
            ("corners", 72.5),
            ("alphabetical", 62.5),
            ("random_points", 35.0),
            ("single_pick", 90.0),
            ("multi_pick", 81.7),
            ("permission_pick", 75.0),
        ],
    },
    ReferenceColumn {
        name: "study: fine-tuned 8B",
        scores: &[
            ("single_nav", 100.0),
            ("corners", 80.0),
            ("alphabetical", 77.5),
            ("random_points", 25.0),
            ("single_pick", 60.0),
            ("multi_pick", 55.6),
            ("permission_pick", 10.0),
        ],
    },
];

/// The names `--reference` accepts.
pub const REFERENCE_NAMES: [&str; 1] = ["study"];

/// The columns of a named reference (`study`), or `None` for a name this crate does not know.
pub fn reference(name: &str) -> Option<&'static [ReferenceColumn]> {
    match name {
        "study" => Some(&STUDY),
        _ => None,
    }
}
