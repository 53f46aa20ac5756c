//! Reporting helpers shared by the benchmark binaries (`stratum-bench`,
//! `stratum-bench-galera`): summary statistics, formatting, and rewriting
//! one marked section of docs/benchmarks.md. Filesystem IO (the results
//! file) and one `date` call.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Median, p95 and max of `v` (zeros when empty).
pub fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    if v.is_empty() {
        return Default::default();
    }
    v.sort();
    let pick = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (pick(0.5), pick(0.95), *v.last().unwrap())
}

/// `123 ms`.
pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Replace the text between the markers `start` and `end` (inclusive) of
/// the results file with `table` (which carries the markers); append it
/// under `heading` when the markers are missing. Other sections are left
/// alone.
pub fn write_section(
    path: &Path,
    start: &str,
    end: &str,
    heading: &str,
    table: &str,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) if b > a => format!("{}{table}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n## {heading}\n\n{table}\n", text.trim_end()),
    };
    std::fs::write(path, new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_in_place_or_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("benchmarks.md");
        std::fs::write(&path, "# Benchmarks\n\nA\n<!-- s -->old<!-- e -->\nB\n").unwrap();
        write_section(
            &path,
            "<!-- s -->",
            "<!-- e -->",
            "X",
            "<!-- s -->new<!-- e -->",
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# Benchmarks\n\nA\n<!-- s -->new<!-- e -->\nB\n"
        );
        write_section(
            &path,
            "<!-- t -->",
            "<!-- u -->",
            "Other",
            "<!-- t -->x<!-- u -->",
        )
        .unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .ends_with("B\n\n## Other\n\n<!-- t -->x<!-- u -->\n")
        );
        let (median, p95, max) = stats(vec![Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!(
            (ms(median), ms(p95), ms(max)),
            ("3 ms".into(), "3 ms".into(), "3 ms".into())
        );
    }
}
