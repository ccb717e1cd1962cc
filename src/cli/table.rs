//! Tables for people: columns as wide as their widest cell (counted in characters), two
//! spaces apart, the last one unpadded — what Docker's tabwriter gives `docker ps`.

/// Formats `header` and `rows` as aligned lines.
pub fn lines(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let n = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate().take(n) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(c);
            if i + 1 < cells.len() {
                let pad = widths[i] - c.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    out.extend(
        rows.iter()
            .map(|r| line(r.iter().map(String::as_str).collect())),
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_fit_the_widest_cell() {
        let l = super::lines(
            &["ID", "NAME", "COMMAND"],
            &[
                vec!["a".into(), "a-very-long-name".into(), "sleep 1".into()],
                vec!["bbbb".into(), "n".into(), "true".into()],
            ],
        );
        assert_eq!(l[0], "ID    NAME              COMMAND");
        assert_eq!(l[1], "a     a-very-long-name  sleep 1");
        assert_eq!(l[2], "bbbb  n                 true");
    }
}
