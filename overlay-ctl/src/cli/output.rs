//! What several commands print the same way: tables, and warnings about the invalid
//! records a listing skipped.
use crate::store::{records::RecordKind, Store};

/// Warns on stderr about the rejected records `relevant` selects (by kind and key
/// without the prefix), once each.
pub fn warn_rejected(
    store: &Store,
    snapshot: &crate::store::records::Snapshot,
    relevant: impl Fn(RecordKind, &str) -> bool,
) {
    for r in &snapshot.rejected {
        let rest = r.key.strip_prefix(store.prefix()).unwrap_or(&r.key);
        if relevant(r.kind, rest) {
            eprintln!(
                "warning: ignoring invalid record {}: {} ({}/{})",
                r.key,
                r.detail,
                r.kind.as_str(),
                r.reason
            );
        }
    }
}

/// Prints `rows` under `headers` in left-aligned columns.
pub fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.to_vec()));
    for row in &rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
}
