//! `previews`: a client that previews headers before downloading: `TOP n 0` on every message
//! of the mixed mailbox, then RETR of ten of them (evenly spread), QUIT. Compared with D
//! byte for byte (every TOP and RETR output, in order).

use crate::pop3::{self, Download};
use crate::{median, ms, Ctx, Result, PASSWORD};

impl Ctx {
    pub fn previews(&mut self) -> Result<()> {
        eprintln!("popbridge-bench: scenario previews");
        self.seed_tput()?;
        let n = self.sizes.tput_msgs;
        let retr: Vec<u64> = (0..10).map(|i| 1 + i * n / 10).collect();
        let mut pb = self.popbridge()?;
        let (d_ep, b_ep) = (self.d_plain(), Self::b_plain(&pb));
        let reference = self.session("previews D warm-up", || {
            pop3::preview(&d_ep, "tput", PASSWORD, &retr)
        })?;
        let warm = self.session("previews B warm-up", || {
            pop3::preview(&b_ep, "tput", PASSWORD, &retr)
        })?;
        self.check("previews", "popbridge", &reference, &warm);
        let (mut d_runs, mut b_runs): (Vec<Download>, Vec<Download>) = (Vec::new(), Vec::new());
        for r in 0..self.runs {
            for side in if r % 2 == 0 { ["D", "B"] } else { ["B", "D"] } {
                let ep = if side == "D" { &d_ep } else { &b_ep };
                let got = self.session(&format!("previews {side} run {r}"), || {
                    pop3::preview(ep, "tput", PASSWORD, &retr)
                })?;
                self.check("previews", side, &reference, &got);
                eprintln!("  previews run {r} {side}: {:.0} ms", ms(got.elapsed));
                if side == "D" {
                    d_runs.push(got);
                } else {
                    b_runs.push(got);
                }
            }
        }
        pb.check_alive()?;
        let rate = |v: &[Download]| {
            median(
                &v.iter()
                    .map(|d| d.messages as f64 / d.elapsed.as_secs_f64())
                    .collect::<Vec<_>>(),
            )
        };
        let (d, b) = (rate(&d_runs), rate(&b_runs));
        self.row(
            "previews",
            &format!("TOP n 0 on {n}, RETR of 10: TOPs/s (whole session)"),
            Some(d),
            Some(b),
            Some(b / d),
            ">= 1.0",
            Some(b / d >= 1.0),
        );
        let t = |v: &[Download]| median(&v.iter().map(|d| ms(d.elapsed)).collect::<Vec<_>>());
        let (d, b) = (t(&d_runs), t(&b_runs));
        self.row(
            "previews",
            "session ms",
            Some(d),
            Some(b),
            Some(b / d),
            "info",
            None,
        );
        Ok(())
    }
}
