//! Observability: `/metrics`, `/healthz` and `/readyz` of a live popbridge in front of a private
//! Dovecot, the Grafana dashboard (`dashboards/popbridge.json`) and the alert rules
//! (`dashboards/alerts.yml`), checked with promtool and a private Prometheus that scrapes
//! popbridge. Needs Dovecot and Prometheus: `scripts/test` installs both.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use support::prometheus::*;
use support::raw::RawPop3 as Raw;
use support::*;

// ---------------------------------------------------------------------------------------------
// The metrics contract

/// Allowed label values; an empty list allows any value of the checked shape.
type Labels = &'static [(&'static str, &'static [&'static str])];

struct Family {
    name: &'static str,
    kind: &'static str,
    labels: Labels,
}

const LISTENER: (&str, &[&str]) = ("listener", &["pop3"]);
/// The backends of the test configurations (`imap`, `tokens`) and `none` (unrouted).
const BACKEND: (&str, &[&str]) = ("backend", &["imap", "tokens", "none"]);
const OUTCOMES: &[&str] = &[
    "quit",
    "timeout",
    "client_gone",
    "upstream_error",
    "shutdown",
    "too_many_errors",
];
const COMMANDS: &[&str] = &[
    "USER", "PASS", "APOP", "AUTH", "CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT",
    "TOP", "UIDL", "STLS", "OTHER",
];

/// Every metric popbridge promises, with its type and labels.
const CONTRACT: &[Family] = &[
    Family {
        name: "popbridge_sessions_active",
        kind: "gauge",
        labels: &[LISTENER],
    },
    Family {
        name: "popbridge_sessions_started_total",
        kind: "counter",
        labels: &[LISTENER],
    },
    Family {
        name: "popbridge_sessions_ended_total",
        kind: "counter",
        labels: &[LISTENER, ("outcome", OUTCOMES)],
    },
    Family {
        name: "popbridge_session_duration_seconds",
        kind: "histogram",
        labels: &[LISTENER],
    },
    Family {
        name: "popbridge_logins_total",
        kind: "counter",
        labels: &[(
            "result",
            &[
                "ok",
                "bad_credentials",
                "upstream_unavailable",
                "refused",
                "in_use",
                "upstream_busy",
                "login_delay",
            ],
        )],
    },
    Family {
        name: "popbridge_upstream_pressure_total",
        kind: "counter",
        labels: &[
            BACKEND,
            ("code", &["throttled", "limit", "inuse", "unavailable"]),
        ],
    },
    Family {
        name: "popbridge_logins_refused_early_total",
        kind: "counter",
        labels: &[BACKEND, ("reason", &["login_delay", "backoff"])],
    },
    Family {
        name: "popbridge_backoffs_total",
        kind: "counter",
        labels: &[BACKEND, ("scope", &["user", "backend"])],
    },
    Family {
        name: "popbridge_pop3_commands_total",
        kind: "counter",
        labels: &[("command", COMMANDS), ("outcome", &["ok", "err"])],
    },
    Family {
        name: "popbridge_pop3_command_duration_seconds",
        kind: "histogram",
        labels: &[("command", COMMANDS)],
    },
    Family {
        name: "popbridge_client_sent_bytes_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_upstream_received_bytes_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_messages_retrieved_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_deletions_total",
        kind: "counter",
        labels: &[("mode", &["hide", "expunge", "move"])],
    },
    Family {
        name: "popbridge_upstream_connect_duration_seconds",
        kind: "histogram",
        labels: &[],
    },
    Family {
        name: "popbridge_upstream_login_duration_seconds",
        kind: "histogram",
        labels: &[],
    },
    Family {
        name: "popbridge_upstream_command_duration_seconds",
        kind: "histogram",
        // IMAP command names: an open set, checked to be upper-case words.
        labels: &[("command", &[])],
    },
    Family {
        name: "popbridge_upstream_errors_total",
        kind: "counter",
        labels: &[(
            "kind",
            &[
                "connect",
                "timeout",
                "closed",
                "tls",
                "protocol",
                "bye",
                "io",
                "command_failed",
            ],
        )],
    },
    Family {
        name: "popbridge_upstream_up",
        kind: "gauge",
        labels: &[],
    },
    Family {
        name: "popbridge_uidl_changed_sessions_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_retr_repeated_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_retr_gone_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_folders_skipped_total",
        kind: "counter",
        labels: &[],
    },
    Family {
        name: "popbridge_retention_removed_total",
        kind: "counter",
        labels: &[("action", &["expunge", "move"])],
    },
    Family {
        name: "popbridge_upstream_keepalive_total",
        kind: "counter",
        labels: &[(
            "outcome",
            &["parked", "reused", "expired", "evicted", "stale"],
        )],
    },
    Family {
        name: "popbridge_upstream_keepalive_parked",
        kind: "gauge",
        labels: &[],
    },
    Family {
        name: "popbridge_upstream_logins_total",
        kind: "counter",
        labels: &[
            ("mechanism", &["login", "plain", "xoauth2", "oauthbearer"]),
            ("result", &["ok", "refused", "failed"]),
        ],
    },
    Family {
        name: "popbridge_oauth_token_requests_total",
        kind: "counter",
        labels: &[
            ("provider", &["custom", "microsoft", "google"]),
            (
                "grant",
                &[
                    "client_credentials",
                    "jwt_bearer",
                    "refresh_token",
                    "device_code",
                ],
            ),
            (
                "result",
                &[
                    "ok",
                    "invalid_grant",
                    "refused",
                    "unavailable",
                    "malformed",
                    "setup",
                ],
            ),
        ],
    },
    Family {
        name: "popbridge_oauth_token_request_duration_seconds",
        kind: "histogram",
        labels: &[],
    },
    Family {
        name: "popbridge_oauth_token_cache_total",
        kind: "counter",
        labels: &[("result", &["hit", "miss"])],
    },
    Family {
        name: "popbridge_accepting",
        kind: "gauge",
        labels: &[],
    },
    Family {
        name: "popbridge_build_info",
        kind: "gauge",
        labels: &[
            ("version", &[env!("CARGO_PKG_VERSION")]),
            ("commit", &[env!("POPBRIDGE_COMMIT")]),
        ],
    },
    Family {
        name: "process_start_time_seconds",
        kind: "gauge",
        labels: &[],
    },
    Family {
        name: "process_open_fds",
        kind: "gauge",
        labels: &[],
    },
    Family {
        name: "process_resident_memory_bytes",
        kind: "gauge",
        labels: &[],
    },
];

// ---------------------------------------------------------------------------------------------
// Prometheus text format (what /metrics serves)

type LabelSet = BTreeMap<String, String>;

#[derive(Debug, Default)]
struct Exposition {
    /// `# TYPE` lines: family name to type.
    types: BTreeMap<String, String>,
    samples: Vec<(String, LabelSet, f64)>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut out = Exposition::default();
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                out.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples.push(parse_sample(line));
        }
        out
    }

    /// The sum of every sample named `name` whose labels include `want` (0 when none).
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).map(|(_, v)| v).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a LabelSet, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, v)| (l, *v))
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

/// `name{k="v",...} value [timestamp]`, with `\\`, `\"` and `\n` escapes in label values.
fn parse_sample(line: &str) -> (String, LabelSet, f64) {
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() && chars[i] != '{' && !chars[i].is_whitespace() {
        i += 1;
    }
    let name: String = chars[..i].iter().collect();
    assert!(!name.is_empty(), "sample line without a name: {line:?}");
    let mut labels = LabelSet::new();
    if chars.get(i) == Some(&'{') {
        i += 1;
        loop {
            while i < chars.len() && (chars[i] == ',' || chars[i].is_whitespace()) {
                i += 1;
            }
            match chars.get(i) {
                Some('}') => {
                    i += 1;
                    break;
                }
                None => panic!("unterminated label set: {line:?}"),
                _ => {}
            }
            let start = i;
            while i < chars.len() && chars[i] != '=' {
                i += 1;
            }
            let key: String = chars[start..i].iter().collect::<String>().trim().into();
            assert_eq!(chars.get(i + 1), Some(&'"'), "bad label in {line:?}");
            i += 2;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    Some('\\') => {
                        value.push(match chars.get(i + 1) {
                            Some('n') => '\n',
                            Some(&c) => c,
                            None => panic!("dangling escape in {line:?}"),
                        });
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                    None => panic!("unterminated label value in {line:?}"),
                }
            }
            labels.insert(key, value);
        }
    }
    let rest: String = chars[i..].iter().collect();
    let text = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sample without a value: {line:?}"));
    let value = match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        t => t
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value {t:?} in {line:?}")),
    };
    (name, labels, value)
}

#[test]
fn text_format_parser_reads_labels_escapes_and_special_values() {
    let e = Exposition::parse(
        "# HELP a_total Help.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\n\
         a_total{x=\"2\"} 4 1700000000000\nb 5e-1\nc{le=\"+Inf\"} +Inf\nd NaN\n",
    );
    assert_eq!(e.types["a_total"], "counter");
    assert_eq!(e.value("a_total", &[]), 7.0);
    assert_eq!(e.value("a_total", &[("y", "q\"\\\n")]), 3.0);
    assert_eq!(e.value("a_total", &[("x", "2")]), 4.0);
    assert_eq!(e.value("b", &[]), 0.5);
    assert_eq!(e.value("c", &[("le", "+Inf")]), f64::INFINITY);
    assert!(e.value("d", &[]).is_nan());
    assert!(!e.has("zzz"));
}

// ---------------------------------------------------------------------------------------------
// PromQL helpers

/// The metric names an expression selects: identifiers that are not functions, keywords,
/// label names (inside `{}` or grouping clauses), durations or strings.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop strings, then label matchers and range/subquery durations.
    let mut flat = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => {
                depth_brace += 1;
                flat.push_str(" {");
            }
            '}' => {
                depth_brace -= 1;
                flat.push_str("} ");
            }
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => flat.push(c),
        }
    }
    let chars: Vec<char> = flat.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_' || c == ':') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && ident(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let grouping = [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ];
        if grouping.contains(&word.to_ascii_lowercase().as_str()) {
            // Skip the label list `( ... )` that may follow.
            if chars.get(j) == Some(&'(') {
                while j < chars.len() && chars[j] != ')' {
                    j += 1;
                }
                i = j + 1;
            }
            continue;
        }
        let keyword = [
            "and",
            "or",
            "unless",
            "bool",
            "offset",
            "inf",
            "nan",
            // Aggregation operators, which may be followed by `by (...)` before their `(`.
            "sum",
            "min",
            "max",
            "avg",
            "group",
            "stddev",
            "stdvar",
            "count",
            "count_values",
            "bottomk",
            "topk",
            "quantile",
        ]
        .contains(&word.to_ascii_lowercase().as_str());
        if keyword || chars.get(j) == Some(&'(') {
            continue;
        }
        names.insert(word);
    }
    names
}

#[test]
fn metric_names_finds_selectors_only() {
    let n = metric_names(
        "histogram_quantile(0.95, sum by (le, command) (rate(a_bucket{command=~\"R.*\", x=\"y\"}[5m]))) \
         / on (job) group_left (version) b > 2 * (c or 0 * d offset 1h) and time() - e",
    );
    let want: BTreeSet<String> = ["a_bucket", "b", "c", "d", "e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(n, want);
}

/// A dashboard expression made concrete: Grafana's interval variables become durations and
/// the dashboard's own template variables match everything.
fn concrete_expr(expr: &str, template_vars: &[String]) -> String {
    let mut e = expr
        .replace("${__rate_interval}", "1m")
        .replace("$__rate_interval", "1m")
        .replace("${__interval}", "15s")
        .replace("$__interval", "15s")
        .replace("${__range}", "5m")
        .replace("$__range", "5m");
    for v in template_vars {
        e = e
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    assert!(
        !e.contains('$'),
        "unknown Grafana variable left in {expr:?} -> {e:?}"
    );
    e
}

// ---------------------------------------------------------------------------------------------
// The dashboard file

struct Dashboard {
    json: serde_json::Value,
}

impl Dashboard {
    fn load() -> Dashboard {
        let text = fs::read_to_string(dashboard_path()).expect("read dashboards/popbridge.json");
        Dashboard {
            json: serde_json::from_str(&text).expect("dashboards/popbridge.json is JSON"),
        }
    }
    fn panels(&self) -> Vec<&serde_json::Value> {
        let mut out = Vec::new();
        for p in self.json["panels"].as_array().expect("panels") {
            out.push(p);
            // Collapsed rows keep their panels inside.
            for inner in p["panels"].as_array().into_iter().flatten() {
                out.push(inner);
            }
        }
        out
    }
    fn template_vars(&self) -> Vec<String> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["name"].as_str().expect("variable name").to_string())
            .collect()
    }
    /// (panel title, expr) of every query target.
    fn exprs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for p in self.panels() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    t["expr"].as_str().expect("target without expr").to_string(),
                ));
            }
        }
        out
    }
    /// The selector inside each `label_values(SELECTOR, label)` variable query.
    fn variable_selectors(&self) -> Vec<String> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                let q = v["definition"].as_str().expect("variable definition");
                let inner = q
                    .strip_prefix("label_values(")
                    .and_then(|q| q.rsplit_once(','))
                    .map(|(sel, _)| sel.trim().to_string())
                    .unwrap_or_else(|| panic!("variable query is not label_values(...): {q}"));
                inner
            })
            .collect()
    }
}

fn is_ds_input(ds: &serde_json::Value) -> bool {
    ds["uid"] == "${DS_PROMETHEUS}" && ds["type"] == "prometheus"
}

#[test]
fn dashboard_is_importable_and_covers_the_contract() {
    let d = Dashboard::load();
    let j = &d.json;
    let inputs = j["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "__inputs must declare DS_PROMETHEUS (datasource, pluginId prometheus): {inputs:?}"
    );
    let schema = j["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(
        (36..=41).contains(&schema),
        "schemaVersion {schema} is not one current Grafana imports as is"
    );
    assert!(j["id"].is_null(), "an exported dashboard has id null");
    assert!(j["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(j["title"].as_str().is_some_and(|t| !t.is_empty()));

    // Every datasource reference anywhere is the input (Grafana's built-in annotation aside).
    fn walk(v: &serde_json::Value, path: &str, bad: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "datasource" && !(is_ds_input(x) || x["uid"] == "-- Grafana --") {
                        bad.push(format!("{path}.datasource = {x}"));
                    }
                    walk(x, &format!("{path}.{k}"), bad);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), bad);
                }
            }
            _ => {}
        }
    }
    let mut bad = Vec::new();
    walk(j, "$", &mut bad);
    assert!(bad.is_empty(), "hard-coded data sources: {bad:#?}");

    let mut ids = BTreeSet::new();
    let mut rows = Vec::new();
    for p in d.panels() {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} used twice");
        let g = &p["gridPos"];
        let (x, w, h) = (g["x"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        assert!(
            matches!((x, w, h), (Some(x), Some(w), Some(h)) if x + w <= 24 && w > 0 && h > 0),
            "{title}: bad gridPos {g}"
        );
        assert!(
            is_ds_input(&p["datasource"]),
            "{title}: datasource must be ${{DS_PROMETHEUS}}"
        );
        if p["type"] == "row" {
            rows.push(title.to_string());
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(is_ds_input(&t["datasource"]), "{title}: target datasource");
            assert!(refs.insert(t["refId"].as_str().expect("refId")));
            assert!(t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
        }
    }
    for row in [
        "Traffic",
        "Latency",
        "Errors",
        "Logins",
        "Upstream IMAP health",
        "UIDL health",
        "Process",
    ] {
        assert!(rows.iter().any(|r| r == row), "no row {row:?} in {rows:?}");
    }
    for v in j["templating"]["list"].as_array().into_iter().flatten() {
        assert!(is_ds_input(&v["datasource"]), "variable {}", v["name"]);
    }

    // Every promised metric is on the dashboard.
    let vars = d.template_vars();
    let used: BTreeSet<String> = d
        .exprs()
        .iter()
        .flat_map(|(_, e)| metric_names(&concrete_expr(e, &vars)))
        .collect();
    let missing: Vec<&str> = CONTRACT
        .iter()
        .map(|f| f.name)
        .filter(|name| {
            !used
                .iter()
                .any(|u| u == name || u.strip_prefix(name).is_some_and(|s| s.starts_with('_')))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "metrics not on the dashboard: {missing:?}"
    );
    // p50/p95/p99 of POP3 command latency, by command.
    for q in ["0.5", "0.95", "0.99"] {
        let want = format!("histogram_quantile({q}, sum by (le, command) (rate(popbridge_pop3_command_duration_seconds_bucket");
        assert!(
            d.exprs().iter().any(|(_, e)| e.starts_with(&want)),
            "no p{q} of POP3 command latency by command"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The alert rules file

/// `alerts.yml` without its `annotations:` blocks, so promtool unit tests compare labels only.
fn alerts_without_annotations() -> String {
    let text = fs::read_to_string(alerts_path()).expect("read dashboards/alerts.yml");
    let mut out = String::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(level) = skip_deeper_than {
            if line.trim().is_empty() || indent > level {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim_start() == "annotations:" {
            skip_deeper_than = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn alert_names() -> Vec<String> {
    fs::read_to_string(alerts_path())
        .expect("read dashboards/alerts.yml")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// promtool unit tests: each alert fires when it should, only after its `for`, with its
/// severity, and stays quiet for the look-alike situations next to it.
const RULE_TESTS: &str = r#"
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="popbridge",instance="a:1"}'
        values: '1 0+0x10'
      - series: 'up{job="popbridge",instance="b:1"}'
        values: '1+0x10'
      - series: 'up{job="node",instance="a:1"}'
        values: '0+0x10'
      - series: 'popbridge_upstream_up{job="popbridge",instance="a:1"}'
        values: '1 0+0x10'
      - series: 'popbridge_upstream_up{job="popbridge",instance="b:1"}'
        values: '1 0 1 0 1 0 1 0 1 0'
      # a: 1/s bad passwords, 0.1/s good ones. b: 1/s bad, 2/s good. c: bad only.
      - series: 'popbridge_logins_total{job="popbridge",instance="a:1",result="bad_credentials"}'
        values: '0+60x30'
      - series: 'popbridge_logins_total{job="popbridge",instance="a:1",result="ok"}'
        values: '0+6x30'
      - series: 'popbridge_logins_total{job="popbridge",instance="b:1",result="bad_credentials"}'
        values: '0+60x30'
      - series: 'popbridge_logins_total{job="popbridge",instance="b:1",result="ok"}'
        values: '0+120x30'
      - series: 'popbridge_logins_total{job="popbridge",instance="c:1",result="bad_credentials"}'
        values: '0+60x30'
      # a: half the commands fail. b: all fail, but only one a minute.
      - series: 'popbridge_pop3_commands_total{job="popbridge",instance="a:1",command="RETR",outcome="err"}'
        values: '0+60x30'
      - series: 'popbridge_pop3_commands_total{job="popbridge",instance="a:1",command="RETR",outcome="ok"}'
        values: '0+60x30'
      - series: 'popbridge_pop3_commands_total{job="popbridge",instance="b:1",command="OTHER",outcome="err"}'
        values: '0+1x30'
      # a: 0.5 timeouts/s. b: one connect error a minute.
      - series: 'popbridge_upstream_errors_total{job="popbridge",instance="a:1",kind="timeout"}'
        values: '0+30x30'
      - series: 'popbridge_upstream_errors_total{job="popbridge",instance="b:1",kind="connect"}'
        values: '0+1x30'
      # a: a session cut by an upstream error every minute. b: one, once.
      - series: 'popbridge_sessions_ended_total{job="popbridge",instance="a:1",listener="pop3",outcome="upstream_error"}'
        values: '0+1x30'
      - series: 'popbridge_sessions_ended_total{job="popbridge",instance="b:1",listener="pop3",outcome="upstream_error"}'
        values: '0 1+0x30'
      # a: one session saw a new UIDVALIDITY at 2m.
      - series: 'popbridge_uidl_changed_sessions_total{job="popbridge",instance="a:1"}'
        values: '0 0 1+0x60'
      - series: 'popbridge_uidl_changed_sessions_total{job="popbridge",instance="b:1"}'
        values: '0+0x60'
      # a: 0.5 logins/s refused by a backoff on backend imap. b: one a minute.
      - series: 'popbridge_logins_refused_early_total{job="popbridge",instance="a:1",backend="imap",reason="backoff"}'
        values: '0+30x30'
      - series: 'popbridge_logins_refused_early_total{job="popbridge",instance="b:1",backend="imap",reason="backoff"}'
        values: '0+1x30'
      - series: 'popbridge_logins_refused_early_total{job="popbridge",instance="b:1",backend="imap",reason="login_delay"}'
        values: '0+60x30'
      # a: one invalid_grant at 3m. b: none, many ok.
      - series: 'popbridge_oauth_token_requests_total{job="popbridge",instance="a:1",provider="m365",grant="refresh_token",result="invalid_grant"}'
        values: '0 0 0 1+0x90'
      - series: 'popbridge_oauth_token_requests_total{job="popbridge",instance="b:1",provider="m365",grant="refresh_token",result="ok"}'
        values: '0+10x30'
      # a: the endpoint unavailable 1/s, nothing ok. b: 1 failure a minute against 10 ok.
      - series: 'popbridge_oauth_token_requests_total{job="popbridge",instance="a:1",provider="m365",grant="client_credentials",result="unavailable"}'
        values: '0+60x30'
      - series: 'popbridge_oauth_token_requests_total{job="popbridge",instance="b:1",provider="m365",grant="client_credentials",result="unavailable"}'
        values: '0+1x30'
    alert_rule_test:
      - eval_time: 2m
        alertname: PopbridgeTargetDown
        exp_alerts: []
      - eval_time: 4m
        alertname: PopbridgeTargetDown
        exp_alerts:
          - exp_labels: {severity: critical, job: popbridge, instance: "a:1"}
      - eval_time: 2m
        alertname: PopbridgeUpstreamDown
        exp_alerts: []
      - eval_time: 4m
        alertname: PopbridgeUpstreamDown
        exp_alerts:
          - exp_labels: {severity: critical, job: popbridge, instance: "a:1"}
      - eval_time: 8m
        alertname: PopbridgeLoginFailureSurge
        exp_alerts: []
      - eval_time: 20m
        alertname: PopbridgeLoginFailureSurge
        exp_alerts:
          - exp_labels: {severity: warning, job: popbridge, instance: "a:1"}
          - exp_labels: {severity: warning, job: popbridge, instance: "c:1"}
      - eval_time: 8m
        alertname: PopbridgeHighPop3ErrorRate
        exp_alerts: []
      - eval_time: 20m
        alertname: PopbridgeHighPop3ErrorRate
        exp_alerts:
          - exp_labels: {severity: warning, job: popbridge, instance: "a:1"}
      - eval_time: 3m
        alertname: PopbridgeUpstreamErrors
        exp_alerts: []
      - eval_time: 20m
        alertname: PopbridgeUpstreamErrors
        exp_alerts:
          - exp_labels: {severity: warning, job: popbridge, instance: "a:1", kind: timeout}
      - eval_time: 20m
        alertname: PopbridgeSessionsEndingWithUpstreamError
        exp_alerts:
          - exp_labels: {severity: warning, job: popbridge, instance: "a:1"}
      - eval_time: 3m
        alertname: PopbridgeUidlChurn
        exp_alerts:
          - exp_labels: {severity: critical, job: popbridge, instance: "a:1"}
      - eval_time: 45m
        alertname: PopbridgeUidlChurn
        exp_alerts: []
      - eval_time: 8m
        alertname: PopbridgeUpstreamPushingBack
        exp_alerts: []
      - eval_time: 20m
        alertname: PopbridgeUpstreamPushingBack
        exp_alerts:
          - exp_labels: {severity: warning, job: popbridge, instance: "a:1", backend: imap}
      - eval_time: 2m
        alertname: PopbridgeOAuthUsersMustAuthorizeAgain
        exp_alerts: []
      - eval_time: 10m
        alertname: PopbridgeOAuthUsersMustAuthorizeAgain
        exp_alerts:
          - exp_labels: {severity: warning, job: popbridge, instance: "a:1", provider: m365}
      - eval_time: 80m
        alertname: PopbridgeOAuthUsersMustAuthorizeAgain
        exp_alerts: []
      - eval_time: 4m
        alertname: PopbridgeOAuthTokenEndpointFailing
        exp_alerts: []
      - eval_time: 20m
        alertname: PopbridgeOAuthTokenEndpointFailing
        exp_alerts:
          - exp_labels: {severity: critical, job: popbridge, instance: "a:1", provider: m365}
"#;

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let alerts = alerts_path();
    let out = promtool(&["check", "rules", alerts.to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let names = alert_names();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("SUCCESS: {} rules found", names.len())),
        "promtool found another number of rules than the {} alerts in the file: {}",
        names.len(),
        String::from_utf8_lossy(&out.stdout)
    );
    for want in [
        "PopbridgeTargetDown",
        "PopbridgeUpstreamDown",
        "PopbridgeLoginFailureSurge",
        "PopbridgeHighPop3ErrorRate",
        "PopbridgeUpstreamErrors",
        "PopbridgeSessionsEndingWithUpstreamError",
        "PopbridgeUidlChurn",
        "PopbridgeUpstreamPushingBack",
        "PopbridgeOAuthUsersMustAuthorizeAgain",
        "PopbridgeOAuthTokenEndpointFailing",
    ] {
        assert!(names.iter().any(|n| n == want), "no alert {want}");
        assert!(
            RULE_TESTS.contains(&format!("alertname: {want}\n")),
            "no unit test for {want}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("alerts.yml");
    fs::write(&rules, alerts_without_annotations()).unwrap();
    let tests = dir.path().join("alerts_test.yml");
    fs::write(
        &tests,
        format!("rule_files:\n  - '{}'\n{RULE_TESTS}", rules.display()),
    )
    .unwrap();
    let out = promtool(&["test", "rules", tests.to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Live popbridge

fn scrape(port: u16) -> Exposition {
    let (status, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    Exposition::parse(&body)
}

/// A scrape taken once no session is running and every started session has ended, so that
/// counters of the sessions just run are complete.
fn scrape_idle(port: u16) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(port);
        let active = m.value("popbridge_sessions_active", &[]);
        let started = m.value("popbridge_sessions_started_total", &[]);
        let ended = m.value("popbridge_sessions_ended_total", &[]);
        if active == 0.0 && started == ended {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "sessions still open 10 s after the clients left: active {active}, started {started}, ended {ended}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts how much a series moved between two scrapes (`want` exact, or at least `min`).
struct Delta<'a> {
    before: &'a Exposition,
    after: &'a Exposition,
    what: &'a str,
}

impl Delta<'_> {
    fn of(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.after.value(name, labels) - self.before.value(name, labels)
    }
    fn eq(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let got = self.of(name, labels);
        assert_eq!(
            got, want,
            "{}: {name}{labels:?} moved by {got}, expected {want}",
            self.what
        );
    }
    fn at_least(&self, name: &str, labels: &[(&str, &str)], min: f64) {
        let got = self.of(name, labels);
        assert!(
            got >= min,
            "{}: {name}{labels:?} moved by {got}, expected at least {min}",
            self.what
        );
    }
}

/// Waits for an HTTP status on `path`; returns the last one seen.
fn wait_status(port: u16, path: &str, want: u16, t: Duration) -> u16 {
    let deadline = Instant::now() + t;
    loop {
        let got = http_get(port, path).map(|(s, _)| s).unwrap_or(0);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_gauge(port: u16, name: &str, want: f64, t: Duration) -> f64 {
    let deadline = Instant::now() + t;
    loop {
        let got = scrape(port).value(name, &[]);
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks the exposition against [`CONTRACT`]: types, label names, label values. Families in
/// `may_lack` may be absent (a labelled family with an open label set has no series until its
/// first event).
fn check_contract(m: &Exposition, which: &str, may_lack: &[&str]) {
    let mut problems = Vec::new();
    for f in CONTRACT {
        if may_lack.contains(&f.name) && !m.types.contains_key(f.name) {
            continue;
        }
        match m.types.get(f.name) {
            Some(k) if k == f.kind => {}
            other => problems.push(format!("{}: TYPE {other:?}, want {}", f.name, f.kind)),
        }
        let sample_names: Vec<String> = if f.kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{}{s}", f.name))
                .collect()
        } else {
            vec![f.name.to_string()]
        };
        for sn in &sample_names {
            if !m.has(sn) {
                problems.push(format!("{sn}: no sample"));
            }
            for (labels, _) in m.matching(sn, &[]) {
                let mut names: BTreeSet<&str> = labels.keys().map(String::as_str).collect();
                if sn.ends_with("_bucket") && !names.remove("le") {
                    problems.push(format!("{sn}{labels:?}: no le"));
                }
                let want: BTreeSet<&str> = f.labels.iter().map(|(k, _)| *k).collect();
                if names != want {
                    problems.push(format!("{sn}{labels:?}: label names, want {want:?}"));
                }
                for (k, allowed) in f.labels {
                    let v = labels.get(*k).map(String::as_str).unwrap_or("");
                    let ok = if allowed.is_empty() {
                        !v.is_empty() && v.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
                    } else {
                        allowed.contains(&v)
                    };
                    if !ok {
                        problems.push(format!("{sn}: {k}={v:?} is not one of {allowed:?}"));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{which} /metrics breaks the metrics contract:\n{}",
        problems.join("\n")
    );
}

fn promtool_check_metrics(port: u16, which: &str) {
    let (status, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let out = promtool(&["check", "metrics"], body.as_bytes());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {which} /metrics ({}):\n{said}",
        out.status
    );
}

fn msg(n: usize) -> Vec<u8> {
    format!(
        "From: sender{n}@example.test\r\nTo: alice@example.test\r\nSubject: message {n}\r\n\r\n\
         Body of message {n}.\r\n{}\r\n",
        "x".repeat(200 * n)
    )
    .into_bytes()
}

fn session_bytes(s: &PopSession) -> usize {
    s.greeting.len() + s.steps.iter().map(|st| st.raw.len()).sum::<usize>()
}

/// Drives every kind of event through two popbridges (one in front of Dovecot, one in front of
/// a closed port) and checks each metric against it; meanwhile a private Prometheus scrapes
/// both, and at the end every dashboard query and every alert rule is run against it.
#[test]
fn metrics_follow_events_and_dashboard_and_alerts_work_in_prometheus() {
    // Prometheus first: it takes a few seconds to start scraping (service discovery updates
    // are batched), and it must see every counter at its initial value.
    let ports = free_ports(3);
    let (ma, mb, closed) = (ports[0], ports[1], ports[2]);
    let (ta, tb) = (format!("127.0.0.1:{ma}"), format!("127.0.0.1:{mb}"));
    let prom = Prometheus::start(&[ta.clone(), tb.clone()]);

    let dc = Dovecot::start();
    dc.add_user("alice", "pw");
    let msgs: Vec<Vec<u8>> = (1..=3).map(msg).collect();
    dc.seed("alice", &msgs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let a = Popbridge::start(&dc, &format!("[metrics]\nlisten = \"127.0.0.1:{ma}\""));
    // b: an upstream port where nothing listens, and a 1 s idle timeout; also a backend that
    // logs in with users' OAuth grants (which creates the token-request series).
    let grants = tempfile::tempdir().unwrap();
    let b = Popbridge::start(
        &dc,
        &format!(
            "[pop3]\nidle_timeout_secs = 1\n[imap]\nport = {closed}\n[metrics]\nlisten = \"127.0.0.1:{mb}\"\n\
             [backends.tokens]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {closed}\nsecurity = \"none\"\n\
             oauth = {{ tokens = \"user\", token_url = \"http://127.0.0.1:{closed}/token\", client_id = \"popbridge\", token_store = \"{}\" }}",
            grants.path().display()
        ),
    );
    assert!(
        wait_port(ma, Duration::from_secs(10)),
        "no metrics listener"
    );
    assert!(
        wait_port(mb, Duration::from_secs(10)),
        "no metrics listener"
    );
    for target in [&ta, &tb] {
        prom.wait_for(
            &format!("up{{job=\"popbridge\", instance=\"{target}\"}} == 1"),
            Duration::from_secs(20),
        );
    }
    let pa = a.pop3_port();

    // Health and readiness.
    assert_eq!(
        wait_status(ma, "/healthz", 200, Duration::from_secs(5)),
        200
    );
    assert_eq!(
        wait_status(ma, "/readyz", 200, Duration::from_secs(10)),
        200
    );
    assert_eq!(
        wait_gauge(ma, "popbridge_upstream_up", 1.0, Duration::from_secs(10)),
        1.0
    );
    assert_eq!(
        wait_status(mb, "/healthz", 200, Duration::from_secs(5)),
        200
    );
    assert_eq!(
        wait_status(mb, "/readyz", 503, Duration::from_secs(10)),
        503
    );
    assert_eq!(
        wait_gauge(mb, "popbridge_upstream_up", 0.0, Duration::from_secs(10)),
        0.0
    );
    assert_eq!(
        http_get(mb, "/healthz").unwrap().0,
        200,
        "/healthz must stay 200 while the upstream is down"
    );

    let m0 = scrape_idle(ma);
    assert_eq!(
        m0.value(
            "popbridge_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("POPBRIDGE_COMMIT"))
            ]
        ),
        1.0
    );
    // Taking sessions, even with the upstream down (that is /readyz's business).
    assert_eq!(m0.value("popbridge_accepting", &[]), 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = m0.value("process_start_time_seconds", &[]);
    assert!(
        start > now - 600.0 && start <= now + 1.0,
        "process_start_time_seconds {start} is not a recent Unix time (now {now})"
    );
    assert!(m0.value("process_open_fds", &[]) >= 3.0);
    assert!(m0.value("process_resident_memory_bytes", &[]) > 1e6);

    // 1. A good session touching most commands; RETR 1 for the first time.
    let s = poplib(
        pa,
        &[
            "capa",
            "user alice",
            "pass pw",
            "stat",
            "list",
            "uidl",
            "top 1 0",
            "noop",
            "rset",
            "retr 1",
            "quit",
        ],
    );
    s.assert_all_ok();
    let m1 = scrape_idle(ma);
    let d = Delta {
        before: &m0,
        after: &m1,
        what: "good session",
    };
    d.eq("popbridge_logins_total", &[("result", "ok")], 1.0);
    d.eq("popbridge_logins_total", &[], 1.0);
    d.eq(
        "popbridge_sessions_started_total",
        &[("listener", "pop3")],
        1.0,
    );
    d.eq(
        "popbridge_sessions_ended_total",
        &[("listener", "pop3"), ("outcome", "quit")],
        1.0,
    );
    d.eq("popbridge_sessions_ended_total", &[], 1.0);
    d.eq(
        "popbridge_session_duration_seconds_count",
        &[("listener", "pop3")],
        1.0,
    );
    for c in [
        "CAPA", "USER", "PASS", "STAT", "LIST", "UIDL", "TOP", "NOOP", "RSET", "RETR", "QUIT",
    ] {
        d.eq(
            "popbridge_pop3_commands_total",
            &[("command", c), ("outcome", "ok")],
            1.0,
        );
        d.eq(
            "popbridge_pop3_command_duration_seconds_count",
            &[("command", c)],
            1.0,
        );
    }
    d.eq("popbridge_pop3_commands_total", &[("outcome", "err")], 0.0);
    d.eq("popbridge_messages_retrieved_total", &[], 1.0);
    d.eq("popbridge_retr_repeated_total", &[], 0.0);
    d.eq(
        "popbridge_client_sent_bytes_total",
        &[],
        session_bytes(&s) as f64,
    );
    d.at_least(
        "popbridge_upstream_received_bytes_total",
        &[],
        msgs[0].len() as f64,
    );
    d.at_least(
        "popbridge_upstream_connect_duration_seconds_count",
        &[],
        1.0,
    );
    d.eq("popbridge_upstream_login_duration_seconds_count", &[], 1.0);
    for c in ["SELECT", "FETCH"] {
        d.at_least(
            "popbridge_upstream_command_duration_seconds_count",
            &[("command", c)],
            1.0,
        );
    }
    d.eq("popbridge_uidl_changed_sessions_total", &[], 0.0);
    d.eq("popbridge_deletions_total", &[], 0.0);
    d.eq("popbridge_upstream_errors_total", &[], 0.0);

    // 2. A wrong password.
    let s = poplib(pa, &["user alice", "pass wrong", "quit"]);
    assert!(!s.step("pass wrong").ok);
    let m2 = scrape_idle(ma);
    let d = Delta {
        before: &m1,
        after: &m2,
        what: "wrong password",
    };
    d.eq(
        "popbridge_logins_total",
        &[("result", "bad_credentials")],
        1.0,
    );
    d.eq("popbridge_logins_total", &[("result", "ok")], 0.0);
    d.eq(
        "popbridge_pop3_commands_total",
        &[("command", "PASS"), ("outcome", "err")],
        1.0,
    );

    // 3. RETR 1 again in a later session; RETR of a message that does not exist; garbage.
    let s = poplib(
        pa,
        &[
            "user alice",
            "pass pw",
            "retr 1",
            "retr 99",
            "raw XYZZY",
            "quit",
        ],
    );
    assert!(s.step("retr 1").ok && !s.step("retr 99").ok && !s.step("raw XYZZY").ok);
    let m3 = scrape_idle(ma);
    let d = Delta {
        before: &m2,
        after: &m3,
        what: "repeated RETR",
    };
    d.eq("popbridge_retr_repeated_total", &[], 1.0);
    d.eq("popbridge_messages_retrieved_total", &[], 1.0);
    d.eq(
        "popbridge_pop3_commands_total",
        &[("command", "RETR"), ("outcome", "ok")],
        1.0,
    );
    d.eq(
        "popbridge_pop3_commands_total",
        &[("command", "RETR"), ("outcome", "err")],
        1.0,
    );
    d.eq(
        "popbridge_pop3_commands_total",
        &[("command", "OTHER"), ("outcome", "err")],
        1.0,
    );

    // 4. RETR 2 (first time), DELE 2, QUIT: a deletion in hide mode.
    let s = poplib(pa, &["user alice", "pass pw", "retr 2", "dele 2", "quit"]);
    s.assert_all_ok();
    let m4 = scrape_idle(ma);
    let d = Delta {
        before: &m3,
        after: &m4,
        what: "DELE in hide mode",
    };
    d.eq("popbridge_deletions_total", &[("mode", "hide")], 1.0);
    d.eq("popbridge_deletions_total", &[], 1.0);
    d.eq(
        "popbridge_pop3_commands_total",
        &[("command", "DELE"), ("outcome", "ok")],
        1.0,
    );
    d.eq("popbridge_retr_repeated_total", &[], 0.0);
    d.at_least(
        "popbridge_upstream_command_duration_seconds_count",
        &[("command", "STORE")],
        1.0,
    );
    let st = dc.imap_state("alice", "pw", "INBOX");
    assert!(st.message(2).is_some_and(|m| m.has_flag("$POP3Deleted")));

    // 5. A second session while one is open: in_use; sessions_active counts the open one.
    let mut held = Raw::ready(pa);
    assert!(held.cmd("USER alice").starts_with("+OK"));
    assert!(held.cmd("PASS pw").starts_with("+OK"));
    let during = scrape(ma);
    assert_eq!(
        during.value("popbridge_sessions_active", &[("listener", "pop3")]),
        1.0
    );
    let s = poplib(pa, &["user alice", "pass pw", "quit"]);
    assert!(!s.step("pass pw").ok, "a second session must be refused");
    assert!(held.cmd("QUIT").starts_with("+OK"));
    let m5 = scrape_idle(ma);
    let d = Delta {
        before: &m4,
        after: &m5,
        what: "concurrent session",
    };
    d.eq("popbridge_logins_total", &[("result", "in_use")], 1.0);
    d.eq("popbridge_logins_total", &[("result", "ok")], 1.0);
    d.eq(
        "popbridge_sessions_ended_total",
        &[("outcome", "quit")],
        2.0,
    );

    // 6. A client that goes away without QUIT; one that sends nothing but garbage.
    let mut gone = Raw::ready(pa);
    assert!(gone.cmd("USER alice").starts_with("+OK"));
    drop(gone);
    let mut noisy = Raw::ready(pa);
    for _ in 0..25 {
        let _ = noisy.writer.write_all(b"XYZZY\r\n");
    }
    assert!(
        noisy.wait_closed(Duration::from_secs(10)),
        "too many errors must close the session"
    );
    let m6 = scrape_idle(ma);
    let d = Delta {
        before: &m5,
        after: &m6,
        what: "abnormal session ends",
    };
    d.eq(
        "popbridge_sessions_ended_total",
        &[("outcome", "client_gone")],
        1.0,
    );
    d.eq(
        "popbridge_sessions_ended_total",
        &[("outcome", "too_many_errors")],
        1.0,
    );
    d.at_least(
        "popbridge_pop3_commands_total",
        &[("command", "OTHER"), ("outcome", "err")],
        19.0,
    );

    // 7. STLS and APOP without TLS or APOP configured: counted under their own names.
    let _ = poplib(
        pa,
        &[
            "raw STLS",
            "raw APOP alice 0123456789abcdef0123456789abcdef",
            "quit",
        ],
    );
    let m7 = scrape_idle(ma);
    let d = Delta {
        before: &m6,
        after: &m7,
        what: "STLS and APOP",
    };
    d.eq("popbridge_pop3_commands_total", &[("command", "STLS")], 1.0);
    d.eq("popbridge_pop3_commands_total", &[("command", "APOP")], 1.0);
    d.eq(
        "popbridge_pop3_commands_total",
        &[("command", "OTHER")],
        0.0,
    );

    // 8. UIDVALIDITY changes upstream: the next session is a UIDL-changed session.
    let uv = dc.imap_state("alice", "pw", "INBOX").uidvalidity;
    let out = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(dc.dir().join("dovecot.conf"))
        .args(["mailbox", "update", "-u", "alice", "--uid-validity"])
        .arg((uv + 1).to_string())
        .arg("INBOX")
        .output()
        .expect("run doveadm");
    assert!(
        out.status.success(),
        "doveadm mailbox update: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    poplib(pa, &["user alice", "pass pw", "uidl", "quit"]).assert_all_ok();
    let m8 = scrape_idle(ma);
    let d = Delta {
        before: &m7,
        after: &m8,
        what: "UIDVALIDITY change",
    };
    d.eq("popbridge_uidl_changed_sessions_total", &[], 1.0);
    // a has no OAuth backend: no token-request series (b has them).
    check_contract(&m8, "popbridge", &["popbridge_oauth_token_requests_total"]);
    promtool_check_metrics(ma, "popbridge");

    // 9. The instance without an upstream: logins fail as upstream_unavailable, the connect
    // error is counted, an idle client times out.
    let b0 = scrape_idle(mb);
    let s = poplib(b.pop3_port(), &["user alice", "pass pw", "quit"]);
    assert!(!s.step("pass pw").ok);
    let mut idle = Raw::ready(b.pop3_port());
    assert!(
        idle.wait_closed(Duration::from_secs(10)),
        "idle timeout of 1 s did not close the session"
    );
    let b1 = scrape_idle(mb);
    let d = Delta {
        before: &b0,
        after: &b1,
        what: "closed upstream",
    };
    d.eq(
        "popbridge_logins_total",
        &[("result", "upstream_unavailable")],
        1.0,
    );
    d.at_least(
        "popbridge_upstream_errors_total",
        &[("kind", "connect")],
        1.0,
    );
    d.eq(
        "popbridge_sessions_ended_total",
        &[("outcome", "timeout")],
        1.0,
    );
    assert_eq!(b1.value("popbridge_upstream_up", &[]), 0.0);
    assert_eq!(http_get(mb, "/readyz").unwrap().0, 503);
    // No IMAP command was ever sent upstream: no series of IMAP command latency yet.
    check_contract(
        &b1,
        "popbridge without upstream",
        &["popbridge_upstream_command_duration_seconds"],
    );
    promtool_check_metrics(mb, "popbridge without upstream");

    // 10. Prometheus: both targets up, every dashboard query and alert rule has data.
    check_prometheus(&prom, &ta, &tb);
}

fn check_prometheus(prom: &Prometheus, ta: &str, tb: &str) {
    let t = Duration::from_secs(15);
    for target in [ta, tb] {
        let up = prom.wait_for(
            &format!("up{{job=\"popbridge\", instance=\"{target}\"}} == 1"),
            t,
        );
        assert_eq!(up.len(), 1);
    }
    // The last events (UIDL change, timeout on b) have been scraped.
    prom.wait_for(
        &format!("popbridge_uidl_changed_sessions_total{{instance=\"{ta}\"}} > 0"),
        t,
    );
    prom.wait_for(
        &format!("popbridge_sessions_ended_total{{instance=\"{tb}\", outcome=\"timeout\"}} > 0"),
        t,
    );

    let d = Dashboard::load();
    let vars = d.template_vars();
    let deadline = Instant::now() + t;
    let mut exprs: Vec<(String, String)> = d
        .exprs()
        .into_iter()
        .map(|(title, e)| (title, concrete_expr(&e, &vars)))
        .chain(
            d.variable_selectors()
                .into_iter()
                .map(|s| ("variable".to_string(), concrete_expr(&s, &vars))),
        )
        .collect();
    // Poll: a rate needs two scrapes of a series.
    loop {
        let mut failing = Vec::new();
        let mut report = Vec::new();
        for (title, e) in exprs {
            match prom.query(&e) {
                Ok(s) if !s.is_empty() => {}
                other => {
                    report.push(format!("[{title}] {e}\n    -> {other:?}"));
                    failing.push((title, e));
                }
            }
        }
        if failing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard queries without data:\n{}",
            report.join("\n")
        );
        exprs = failing;
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every metric a panel uses exists in Prometheus.
    let names: BTreeSet<String> = d
        .exprs()
        .iter()
        .flat_map(|(_, e)| metric_names(&concrete_expr(e, &vars)))
        .collect();
    for n in &names {
        let r = prom.query(&format!("count({{__name__=\"{n}\"}})"));
        assert!(
            r.as_ref().is_ok_and(|s| !s.is_empty()),
            "dashboard metric {n} has no series in Prometheus: {r:?}"
        );
    }

    check_alert_rules(prom, ta, tb);
}

fn check_alert_rules(prom: &Prometheus, ta: &str, tb: &str) {
    let expected = alert_names();
    let deadline = Instant::now() + Duration::from_secs(15);
    let rules = loop {
        let (status, body) = http_get(prom.port(), "/api/v1/rules").expect("GET /api/v1/rules");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.len() == expected.len()
            && rules
                .iter()
                .all(|r| r["health"] == "ok" || r["health"] == "err");
        if evaluated {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has not loaded and evaluated the {} alert rules: {body}",
            expected.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in &rules {
        let name = r["name"].as_str().unwrap_or("?");
        assert_eq!(r["type"], "alerting", "{name}");
        assert_eq!(
            r["health"], "ok",
            "alert {name} does not evaluate: {}",
            r["lastError"]
        );
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "alert {name}: severity label"
        );
        for a in ["summary", "description"] {
            assert!(
                r["annotations"][a].as_str().is_some_and(|s| !s.is_empty()),
                "alert {name}: no {a} annotation"
            );
        }
        let expr = r["query"].as_str().expect("query");
        prom.query(expr)
            .unwrap_or_else(|e| panic!("alert {name}: {expr} fails: {e}"));
        for n in metric_names(expr) {
            let s = prom.query(&format!("count({{__name__=\"{n}\"}})")).unwrap();
            assert!(!s.is_empty(), "alert {name} uses {n}, which has no series");
        }
    }
    // The upstream-down alert is pending (for: 2m) for the instance without an upstream only;
    // the UIDL churn alert (for: 0m) fires for the instance whose mailbox changed UIDVALIDITY.
    let pending = prom.wait_for(
        "ALERTS{alertname=\"PopbridgeUpstreamDown\"}",
        Duration::from_secs(10),
    );
    let instances: Vec<(&str, &str)> = pending
        .iter()
        .map(|s| {
            (
                s.label("instance").unwrap_or(""),
                s.label("alertstate").unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(instances, vec![(tb, "pending")]);
    let firing = prom.wait_for(
        "ALERTS{alertname=\"PopbridgeUidlChurn\", alertstate=\"firing\"}",
        Duration::from_secs(10),
    );
    let instances: Vec<&str> = firing
        .iter()
        .map(|s| s.label("instance").unwrap_or(""))
        .collect();
    assert_eq!(instances, vec![ta]);
    assert_eq!(firing[0].label("severity"), Some("critical"));
}
