//! Progress for library work that runs in stages (eval, re-scoring, training): one indicatif
//! bar per stage with rate and ETA.

use std::time::Duration;

use distill_core::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// One indicatif bar per stage: rate and ETA.
#[derive(Default)]
pub struct StageBars {
    bar: std::cell::RefCell<Option<ProgressBar>>,
    label: std::cell::RefCell<String>,
}

impl Progress for StageBars {
    fn stage(&self, label: &str, total: u64) {
        let bar = ProgressBar::new(total).with_message(label.to_string());
        bar.set_style(
            ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        *self.bar.borrow_mut() = Some(bar);
        *self.label.borrow_mut() = label.to_string();
    }

    fn message(&self, msg: &str) {
        if let Some(b) = self.bar.borrow().as_ref() {
            b.set_message(format!("{} | {msg}", self.label.borrow()));
        }
    }

    fn advance(&self, n: u64) {
        if let Some(b) = self.bar.borrow().as_ref() {
            b.inc(n);
        }
    }

    fn finish_stage(&self) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish();
        }
    }
}
