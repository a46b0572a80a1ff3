//! The layers of `src/` stay true: every module has a layer (docs/architecture.md's table), a module
//! only uses modules of its own layer or below, and no two modules use each other, directly or
//! through others. Read from the `crate::` and `super::` paths of the code (comments and the
//! `#[cfg(test)]` part at the end of a file left out), so a new `use` that points the wrong
//! way fails here with the file and the path.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Module path prefix → layer, lowest first. The longest matching prefix wins.
const LAYERS: &[(&str, u8, &str)] = &[
    // 0: the protocol core, sans-I/O: what a byte means, what a session decides.
    ("uidl", 0, "core"),
    ("pop3::command", 0, "core"),
    ("pop3::response", 0, "core"),
    ("pop3::session", 0, "core"),
    // pop3/mod.rs only declares and re-exports.
    ("pop3", 0, "core"),
    ("maildrop", 0, "core"),
    ("metrics", 0, "core"),
    ("limits", 0, "core"),
    ("live", 0, "core"),
    ("errors", 0, "core"),
    ("proxy_protocol", 0, "core"),
    ("routing", 0, "core"),
    ("migrate::matcher", 0, "core"),
    // 1: talking to servers and keeping local state.
    ("upstream", 1, "upstream"),
    ("client_tls", 1, "upstream"),
    ("state", 1, "upstream"),
    ("password_file", 1, "upstream"),
    // 2: the configuration, made of each subsystem's own settings.
    ("config", 2, "config"),
    // 3: maildrops: the IMAP-backed maildrop (snapshot, retrieval, commit).
    ("maildrop::imap", 3, "maildrops"),
    // 4: session drivers: the POP3 connection driver, the relay, migrate runs.
    ("pop3::connection", 4, "drivers"),
    ("pop3::relay", 4, "drivers"),
    ("pop3::routed", 4, "drivers"),
    ("pop3::locks", 4, "drivers"),
    ("pop3::login", 4, "drivers"),
    ("pop3::retrieve", 4, "drivers"),
    ("pop3::stream", 4, "drivers"),
    ("migrate", 4, "drivers"),
    ("migrate::store", 4, "drivers"),
    // 5: the server: listeners, backends, health, reload.
    ("backends", 5, "server"),
    ("http", 5, "server"),
    ("server", 5, "server"),
    // 6: the binary's own modules (src/cli/, under main.rs): arguments and printing.
    ("cli", 6, "binary"),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`; `None` for the crate roots and `bin/`.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments, string contents and its trailing test part.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The paths (`a::b::c`, as written after `crate::`) a file's code names, with `super::`
/// resolved against the file's module and `{a, b::c}` groups expanded one level.
fn paths_named(code: &str, module: &str) -> Vec<String> {
    let mut out = Vec::new();
    let parent: Vec<&str> = {
        let mut p: Vec<&str> = module.split("::").collect();
        p.pop();
        p
    };
    let mut push_path = |base: &str, rest: &str| {
        // rest starts right after `crate::` or the resolved `super::`.
        let rest = rest.trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let p = item.trim().replace(char::is_whitespace, "");
                        if !p.is_empty() {
                            out.push(join(base, &p));
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            let p = item.trim().replace(char::is_whitespace, "");
            if !p.is_empty() {
                out.push(join(base, &p));
            }
            return;
        }
        let mut p = String::new();
        let mut s = rest;
        loop {
            let id = ident_at(s);
            if id.is_empty() {
                break;
            }
            if !p.is_empty() {
                p.push_str("::");
            }
            p.push_str(id);
            s = &s[id.len()..];
            match s.strip_prefix("::") {
                Some(r) if !r.starts_with('{') => s = r,
                _ => break,
            }
        }
        if !p.is_empty() {
            out.push(join(base, &p));
        }
    };
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        push_path("", &code[i + "crate::".len()..]);
    }
    for (i, _) in code.match_indices("super::") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &code[i + "super::".len()..];
        let mut up = parent.clone();
        // `super::super::x`
        while let Some(r) = rest.strip_prefix("super::") {
            up.pop();
            rest = r;
        }
        push_path(&up.join("::"), rest);
    }
    out
}

fn join(base: &str, p: &str) -> String {
    if base.is_empty() {
        p.to_owned()
    } else {
        format!("{base}::{p}")
    }
}

/// The longest known module that is a prefix of `path`.
fn resolve<'a>(path: &str, modules: &'a BTreeSet<String>) -> Option<&'a String> {
    let mut best = None;
    for m in modules {
        if (path == m || path.starts_with(&format!("{m}::")))
            && best.is_none_or(|b: &String| m.len() > b.len())
        {
            best = Some(m);
        }
    }
    best
}

fn layer_of(module: &str) -> Option<(u8, &'static str)> {
    LAYERS
        .iter()
        .filter(|(prefix, _, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|(_, l, name)| (*l, *name))
}

/// file module → (used module → one path that names it)
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut edges = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let code = code_of(&fs::read_to_string(file).expect("read source"));
        let mut uses = BTreeMap::new();
        for path in paths_named(&code, &module) {
            if let Some(target) = resolve(&path, &modules) {
                // A module naming its own children (or itself) is not a dependency.
                if *target != module && !target.starts_with(&format!("{module}::")) {
                    uses.entry(target.clone()).or_insert(path);
                }
            }
        }
        edges.insert(module, uses);
    }
    edges
}

#[test]
fn every_module_has_a_layer() {
    let missing: Vec<String> = graph()
        .keys()
        .filter(|m| layer_of(m).is_none())
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a layer (add them to LAYERS here and to docs/architecture.md): {missing:?}"
    );
}

#[test]
fn dependencies_point_down_only() {
    let mut wrong = Vec::new();
    for (module, uses) in graph() {
        let Some((layer, name)) = layer_of(&module) else {
            continue;
        };
        for (target, path) in uses {
            // A parent module (`mod.rs`) that declares its children is not using them.
            if module.split("::").count() < target.split("::").count()
                && target.starts_with(&format!("{module}::"))
            {
                continue;
            }
            if let Some((tl, tname)) = layer_of(&target) {
                if tl > layer {
                    wrong.push(format!(
                        "{module} ({name}) uses {target} ({tname}) through crate::{path}"
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up a layer:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn no_module_cycles() {
    let g = graph();
    // Tarjan's strongly connected components.
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        cycles: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(uses) = s.g.get(v) {
            for w in uses.keys() {
                let w = w.as_str();
                if !s.g.contains_key(w) {
                    continue;
                }
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(lw));
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low[v];
                    s.low.insert(v, lv.min(iw));
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.cycles.push(comp);
            }
        }
    }
    let mut s = State {
        g: &g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    let described: Vec<String> = s
        .cycles
        .iter()
        .map(|c| {
            let links: Vec<String> = c
                .iter()
                .flat_map(|m| {
                    g[m].iter()
                        .filter(|(t, _)| c.contains(t))
                        .map(move |(t, p)| format!("{m} -> {t} (crate::{p})"))
                })
                .collect();
            format!("{}: {}", c.join(" <-> "), links.join("; "))
        })
        .collect();
    assert!(
        described.is_empty(),
        "module cycles:\n  {}",
        described.join("\n  ")
    );
}

/// The checker itself: paths are found through `use` groups, `super::` and inline paths, and
/// comments do not count.
#[test]
fn the_reader_finds_every_kind_of_path() {
    let code = code_of(
        "use crate::{a::B, c};\n// use crate::commented;\nfn f() { crate::d::e(); \"crate::in_string\"; }\nuse super::{sib, other::X};\nuse super::super::up;\n",
    );
    let mut found = paths_named(&code, "x::y::z");
    found.sort();
    assert_eq!(
        found,
        vec!["a::B", "c", "d::e", "x::up", "x::y::other::X", "x::y::sib"]
    );
}
