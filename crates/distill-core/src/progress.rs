//! Where long library work reports how far it got: the CLI draws indicatif bars behind this
//! trait, tests and library users pass [`Silent`]. Library crates never draw themselves.

/// Stage-by-stage progress: a labelled stage of `total` units, advanced as units finish.
pub trait Progress {
    fn stage(&self, label: &str, total: u64);
    fn advance(&self, n: u64);
    fn finish_stage(&self);
    /// What the current stage is doing now (a phase, the latest loss); nothing by default.
    fn message(&self, _msg: &str) {}
}

/// Progress that goes nowhere (tests, library use).
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish_stage(&self) {}
}
