//! A test-only pause at named points of `run`, `attach` and `network create`, so the
//! integration tests can kill the process (or the store) at exactly that step.
//!
//! With `OVERLAY_TEST_PAUSE=POINT:FILE` in the environment, reaching `POINT` creates
//! `FILE` and waits (blocking the thread, as a stopped process would) until the test
//! removes it. Without the variable, or at any other point, nothing happens. The clean-up
//! a test then observes is the product's own; this only chooses the moment.
use std::{path::PathBuf, time::Duration};

pub const ENV: &str = "OVERLAY_TEST_PAUSE";

/// Pauses here if the environment asks for `point`.
pub fn pause(point: &str) {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let Some((wanted, file)) = spec.split_once(':') else {
        return;
    };
    if wanted != point {
        return;
    }
    let file = PathBuf::from(file);
    if std::fs::write(&file, point).is_err() {
        return;
    }
    while file.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}
