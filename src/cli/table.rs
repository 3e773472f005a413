//! Tables for people: columns as wide as their widest value (an id is never cut, so it can be
//! pasted into the next command), and long free text (a failure detail) on indented lines under
//! its row, wrapped at word boundaries to the terminal's width. `--wide` puts that text at the
//! end of the row instead, whole.

/// The width tables wrap to: the terminal's, else `$COLUMNS`, else 100.
pub fn width() -> usize {
    console::Term::stdout()
        .size_checked()
        .map(|(_, cols)| usize::from(cols))
        .or_else(|| std::env::var("COLUMNS").ok()?.trim().parse().ok())
        .filter(|w| *w >= 40)
        .unwrap_or(100)
}

/// One table: headers, rows, and under each row its notes.
pub struct Table {
    headers: Vec<&'static str>,
    /// Columns aligned to the right (numbers).
    right: Vec<bool>,
    rows: Vec<(Vec<String>, Vec<String>)>,
}

impl Table {
    /// `headers` ending in `>` are right-aligned (the `>` is not shown).
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            right: headers.iter().map(|h| h.ends_with('>')).collect(),
            headers: headers.iter().map(|h| h.trim_end_matches('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// A row; `notes` are free text shown under it (or after it with `wide`).
    pub fn row(&mut self, cells: Vec<String>, notes: Vec<String>) {
        self.rows.push((cells, notes));
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self, width: usize, wide: bool) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for (cells, _) in &self.rows {
            for (i, c) in cells.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let line = |cells: &[String]| -> String {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = w.saturating_sub(c.chars().count());
                if i > 0 {
                    out.push_str("  ");
                }
                if self.right[i] {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(c);
                } else {
                    out.push_str(c);
                    if i + 1 < widths.len() {
                        out.push_str(&" ".repeat(pad));
                    }
                }
            }
            out.trim_end().to_string()
        };
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut out = line(&headers);
        out.push('\n');
        for (cells, notes) in &self.rows {
            let mut row = line(cells);
            if wide {
                for n in notes {
                    row.push_str("  ");
                    row.push_str(n);
                }
                out.push_str(&row);
                out.push('\n');
                continue;
            }
            out.push_str(&row);
            out.push('\n');
            for n in notes {
                for l in wrap(n, width.saturating_sub(4).max(20)) {
                    out.push_str("    ");
                    out.push_str(&l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Wrap at spaces to lines of at most `width` characters; a single word longer than that is
/// left whole on its own line (never cut: it may be an id).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let len = current.chars().count();
        if len > 0 && len + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(word);
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// `-` for a missing value.
pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_never_cuts_a_word() {
        let text = "Genesys Cloud rejected the request: 404 not.found: queue a-very-long-identifier-that-is-longer-than-the-width does not exist";
        let lines = wrap(text, 30);
        assert!(lines.iter().all(|l| l.len() <= 30 || !l.contains(' ')));
        assert_eq!(lines.join(" "), text);
    }

    #[test]
    fn columns_fit_their_widest_value_and_notes_go_under() {
        let mut t = Table::new(&["ID", "N>"]);
        let id = "k".repeat(64);
        t.row(vec![id.clone(), "7".into()], vec!["word ".repeat(40)]);
        t.row(vec!["short".into(), "12".into()], vec![]);
        let out = t.render(60, false);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with(&id), "the id is whole: {out}");
        assert!(lines[1].ends_with(" 7"));
        assert!(lines[2].starts_with("    word"));
        assert!(lines.iter().all(|l| l.chars().count() <= 68), "{out}");
        let wide = t.render(60, true);
        assert_eq!(wide.lines().count(), 3, "one line per row with --wide");
    }
}
