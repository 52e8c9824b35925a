//! Prometheus metrics of the agent (being written: see issue #5).
