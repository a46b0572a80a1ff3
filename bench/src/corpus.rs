//! The benchmark's mailboxes: deterministic messages of chosen sizes cut from a pool of
//! CRLF text lines (some starting with a dot, so dot-stuffing is exercised).

/// splitmix64: small, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform integer in [lo, hi].
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        ((a + self.unit() * (b - a)).exp() as u64).clamp(lo, hi)
    }
}

/// Body text: ~4 MiB of 30..78-character CRLF lines; about one line in 40 starts with a dot
/// (so dot-stuffing is exercised), one in 25 is empty.
pub struct Pool {
    text: Vec<u8>,
    /// Offsets where lines start.
    starts: Vec<usize>,
}

impl Pool {
    pub fn new(seed: u64) -> Pool {
        const WORDS: &[&str] = &[
            "the",
            "mail",
            "server",
            "proxy",
            "quarterly",
            "report",
            "attached",
            "please",
            "invoice",
            "meeting",
            "tomorrow",
            "regards",
            "ticket",
            "scanner",
            "document",
            "pop3",
            "imap",
            "bridge",
            "lorem",
            "ipsum",
            "dolor",
            "sit",
            "amet",
            "consectetur",
        ];
        let mut rng = Rng::new(seed);
        let mut text = Vec::with_capacity(4 << 20);
        let mut starts = Vec::new();
        while text.len() < 4 << 20 {
            starts.push(text.len());
            let r = rng.next() % 1000;
            if r < 40 {
                text.extend_from_slice(b"\r\n");
                continue;
            }
            if r < 65 {
                text.push(b'.');
            }
            let len = 30 + (rng.next() % 49) as usize;
            let start = text.len();
            while text.len() - start < len {
                let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
                text.extend_from_slice(w.as_bytes());
                text.push(b' ');
            }
            text.extend_from_slice(b"\r\n");
        }
        Pool { text, starts }
    }

    /// A message of about `size` octets (at least the header): CRLF line ends, ends in CRLF.
    pub fn message(&self, id: u64, size: u64, rng: &mut Rng) -> Vec<u8> {
        let mut m = format!(
            "Return-Path: <sender@example.org>\r\nFrom: Bench Sender <sender@example.org>\r\n\
             To: user@example.net\r\nSubject: popbridge bench message {id}\r\n\
             Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <{id}.bench@example.org>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        .into_bytes();
        let size = size as usize;
        while m.len() < size {
            let want = size - m.len();
            let i = (rng.next() % self.starts.len() as u64) as usize;
            let from = self.starts[i];
            let avail = self.text.len() - from;
            let mut take = want.min(avail);
            // Cut at a line end: extend to the next CRLF.
            match self.text[from + take.saturating_sub(1)..]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                Some(p) => take = take.saturating_sub(1) + p + 2,
                None => take = avail,
            }
            m.extend_from_slice(&self.text[from..from + take]);
        }
        m
    }
}
