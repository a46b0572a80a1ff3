//! UID sets for commands: compact `a:b,c` ranges, split so no command line grows past a few
//! KiB.

use imap_next::imap_types::sequence::SequenceSet;

/// UIDs as compact `a:b,c` sets, split so no command line grows past a few KiB.
pub fn uid_sets(uids: &[u32]) -> Result<Vec<SequenceSet>, String> {
    uid_set_texts(uids, 4000)
        .iter()
        .map(|t| parse_set(t))
        .collect()
}

/// The same sets as text (sorted, no zero, no duplicate), a new one begun once one is
/// `max_chars` long: for commands written by hand (EMAILID, which imap-codec cannot express).
pub fn uid_set_texts(uids: &[u32], max_chars: usize) -> Vec<String> {
    let mut sorted: Vec<u32> = uids.iter().copied().filter(|&u| u != 0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        i += 1;
        if !text.is_empty() {
            text.push(',');
        }
        if start == end {
            text.push_str(&start.to_string());
        } else {
            text.push_str(&format!("{start}:{end}"));
        }
        if text.len() > max_chars {
            out.push(std::mem::take(&mut text));
        }
    }
    if !text.is_empty() {
        out.push(text);
    }
    out
}

fn parse_set(text: &str) -> Result<SequenceSet, String> {
    SequenceSet::try_from(text).map_err(|e| format!("UID set: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(uids: &[u32]) -> Vec<String> {
        uid_sets(uids)
            .unwrap()
            .iter()
            .map(|s| {
                s.0.as_ref()
                    .iter()
                    .map(|seq| format!("{seq:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    #[test]
    fn uid_sets_are_compact_and_bounded() {
        assert!(uid_sets(&[]).unwrap().is_empty());
        assert_eq!(uid_sets(&[5, 1, 2, 3, 9, 9, 10]).unwrap().len(), 1);
        let r = render(&[5, 1, 2, 3, 9, 10]);
        assert_eq!(r.len(), 1);
        // 100k scattered UIDs must split into several bounded commands, losing none.
        let many: Vec<u32> = (1..=100_000).map(|i| i * 2).collect();
        let sets = uid_sets(&many).unwrap();
        assert!(sets.len() > 1);
        let total: usize = sets.iter().map(|s| s.0.as_ref().len()).sum();
        assert_eq!(total, 100_000);
    }
}
