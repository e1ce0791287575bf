//! Moderation commands: `list` (match lists: create, add, remove, show, delete, ls), `lists`,
//! `matches`, `review` (the queue, and `review decide`) and `audit`. Every change they make is
//! audited with the actor `cli`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use super::collection::{open_existing, IndexArgs, Instead};
use super::progress::ProgressRenderer;
use super::recorded_source;
use crate::engine::models::{retriever_info, select_device, ModelSource, Retriever};
use crate::engine::{
    AuditEntry, EntriesAdded, Flag, ImageId, ListEntry, ListInfo, Match, MatchParams, Verdict,
    DEFAULT_MIN_COSINE, DEFAULT_PDQ_DISTANCE,
};

/// Who the command line's changes are audited as.
const ACTOR: &str = "cli";

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(subcommand)]
    command: ListCommand,
}

/// What `list` does.
#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Create an empty match list.
    Create(ListName),
    /// Add reference images (files, or folders of them, recursively) to a list: their PDQ
    /// hashes (the eight rotations and mirrors) and ITC vectors are stored, the images are not.
    /// With --pdq, add the hex PDQ hashes of a file instead (one per line, optionally a comma
    /// and a label). The collection is then checked against the new entries.
    Add(ListAddArgs),
    /// Remove one entry of a list (by its id, as `list show` prints it).
    Remove(ListRemoveArgs),
    /// Print a list's entries.
    Show(ListShowArgs),
    /// Delete a list, its entries, and the flags it put on images.
    Delete(ListName),
    /// Print every list with its size.
    Ls(ListsArgs),
}

/// A list by name.
#[derive(Debug, Args)]
pub struct ListName {
    #[command(flatten)]
    index: IndexArgs,
    /// The list: 1 to 64 of a-z, 0-9, _ and -.
    name: String,
}

/// `list add`.
#[derive(Debug, Args)]
pub struct ListAddArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// The list.
    name: String,
    /// Reference image files or folders.
    #[arg(required_unless_present = "pdq", conflicts_with = "pdq")]
    paths: Vec<PathBuf>,
    /// A file of hex PDQ hashes, one per line, optionally followed by a comma and a label; a
    /// header line and blank lines are skipped.
    #[arg(long, value_name = "FILE")]
    pdq: Option<PathBuf>,
    /// A label for the reference images added.
    #[arg(long, conflicts_with = "pdq")]
    label: Option<String>,
    /// The retrieval model's directory, when it is no longer where the collection recorded it
    /// [default: the collection's].
    #[arg(long, env = "BLIPSEARCH_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "BLIPSEARCH_DEVICE", default_value = "auto")]
    device: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `list remove`.
#[derive(Debug, Args)]
pub struct ListRemoveArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// The list.
    name: String,
    /// The entry's id.
    entry: u64,
}

/// `list show`.
#[derive(Debug, Args)]
pub struct ListShowArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// The list.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `list ls` and `lists`.
#[derive(Debug, Args)]
pub struct ListsArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `matches`.
#[derive(Debug, Args)]
pub struct MatchesArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// Only this list's entries [default: every list].
    #[arg(long)]
    list: Option<String>,
    /// Largest PDQ Hamming distance (of 256 bits) that matches.
    #[arg(long, default_value_t = DEFAULT_PDQ_DISTANCE)]
    pdq_distance: u32,
    /// Smallest ITC cosine with a reference image that matches.
    #[arg(long, default_value_t = DEFAULT_MIN_COSINE)]
    min_cosine: f32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `review`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ReviewArgs {
    #[command(subcommand)]
    decide: Option<ReviewCommand>,
    #[command(flatten)]
    index: IndexArgs,
    /// Only flags of this list.
    #[arg(long)]
    list: Option<String>,
    /// Images shown.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Images skipped.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What `review` does besides listing the queue.
#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// Decide on every flag of an image that waits for review.
    Decide(DecideArgs),
}

/// `review decide`.
#[derive(Debug, Args)]
pub struct DecideArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// The image's id.
    id: u64,
    /// confirmed (it is what the entry stands for) or cleared (a false match: never flagged
    /// again for the same entry).
    verdict: VerdictArg,
    /// Why.
    #[arg(long, default_value = "")]
    note: String,
}

/// A verdict on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum VerdictArg {
    /// The image is what the entry stands for.
    Confirmed,
    /// A false match.
    Cleared,
}

/// `audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    index: IndexArgs,
    /// Only events after this one (its `seq`).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many events [default: all].
    #[arg(long)]
    limit: Option<usize>,
    /// Print JSON (an array of events).
    #[arg(long)]
    json: bool,
}

/// A list entry as printed: its PDQ hashes in hex, and whether it has a reference vector
/// (the vector itself is not printed).
#[derive(Debug, Serialize)]
struct EntryOut<'a> {
    list: &'a str,
    id: u64,
    label: Option<&'a str>,
    source: Option<&'a str>,
    pdq: Vec<String>,
    quality: Option<u8>,
    vector: bool,
    added_unix: i64,
}

impl<'a> From<&'a ListEntry> for EntryOut<'a> {
    fn from(e: &'a ListEntry) -> Self {
        Self {
            list: &e.list,
            id: e.id,
            label: e.label.as_deref(),
            source: e.source.as_deref(),
            pdq: e.pdq.iter().map(|h| h.to_hex()).collect(),
            quality: e.quality,
            vector: e.itc.is_some(),
            added_unix: e.added_unix,
        }
    }
}

/// Runs `list`.
pub fn list(a: ListArgs) -> Result<()> {
    match a.command {
        ListCommand::Create(a) => {
            let engine = open_existing(&a.index, Instead::Moderate)?;
            let info = engine.create_list(&a.name, ACTOR)?;
            println!("created list {}", info.name);
            Ok(())
        }
        ListCommand::Add(a) => add(a),
        ListCommand::Remove(a) => {
            let engine = open_existing(&a.index, Instead::Moderate)?;
            let e = engine.remove_list_entry(&a.name, a.entry, ACTOR)?;
            println!("removed entry {} from {}{}", e.id, a.name, describe(&e));
            Ok(())
        }
        ListCommand::Show(a) => {
            let engine = open_existing(&a.index, Instead::Moderate)?;
            let info = engine.lists()?.into_iter().find(|l| l.name == a.name);
            let entries = engine.list_entries(&a.name)?;
            let info = info.context("the list was deleted meanwhile")?;
            if a.json {
                let out: Vec<EntryOut> = entries.iter().map(EntryOut::from).collect();
                println!("{}", serde_json::json!({ "list": info, "entries": out }));
                return Ok(());
            }
            println!("{} ({} entries)", info.name, entries.len());
            for e in &entries {
                let kind = match (e.pdq.len(), e.itc.is_some()) {
                    (_, true) => "image",
                    (_, false) => "hash",
                };
                let hash = e
                    .pdq
                    .first()
                    .map(|h| h.to_hex())
                    .unwrap_or_else(|| "-".into());
                println!("  {:>16}  {kind:5}  {hash}{}", e.id, describe(e));
            }
            Ok(())
        }
        ListCommand::Delete(a) => {
            let engine = open_existing(&a.index, Instead::Moderate)?;
            let info = engine.delete_list(&a.name, ACTOR)?;
            println!(
                "deleted list {} and its {} entries (and the flags it put on images)",
                info.name, info.entries
            );
            Ok(())
        }
        ListCommand::Ls(a) => lists(a),
    }
}

/// ` (label; source)` of an entry, or nothing.
fn describe(e: &ListEntry) -> String {
    let parts: Vec<&str> = [e.label.as_deref(), e.source.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    match parts.is_empty() {
        true => String::new(),
        false => format!("  ({})", parts.join("; ")),
    }
}

/// Runs `lists` (and `list ls`).
pub fn lists(a: ListsArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Moderate)?;
    let lists: Vec<ListInfo> = engine.lists()?;
    if a.json {
        println!("{}", serde_json::to_string(&lists)?);
        return Ok(());
    }
    if lists.is_empty() {
        println!("no match lists");
    }
    for l in &lists {
        println!("{}\t{} entries", l.name, l.entries);
    }
    Ok(())
}

fn add(a: ListAddArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Moderate)?;
    let added = match &a.pdq {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the hash file {}", file.display()))?;
            let source = file.file_name().map(|n| n.to_string_lossy().into_owned());
            engine.add_list_hashes(&a.name, &text, source.as_deref(), ACTOR)?
        }
        None => {
            // Checked before the model loads.
            engine.list_entries(&a.name)?;
            let name = engine.info()?.retrieval_model;
            let source = match &a.model_dir {
                Some(dir) => ModelSource::Dir(dir.clone()),
                None => recorded_source(&name)?,
            };
            let device = select_device(&a.device)?;
            let retriever = Retriever::load(&source, &device).with_context(|| {
                format!("loading {name}, the model this collection was built with")
            })?;
            engine.adopt_models(&retriever_info(&retriever))?;
            engine.add_list_files(
                &retriever,
                &a.name,
                &a.paths,
                a.label.as_deref(),
                ACTOR,
                &ProgressRenderer::new(),
            )?
        }
    };
    print_added(&added, a.json)?;
    if added.added.is_empty() && !added.skipped.is_empty() {
        bail!("nothing was added to {}", added.list);
    }
    Ok(())
}

fn print_added(added: &EntriesAdded, json: bool) -> Result<()> {
    if json {
        let entries: Vec<EntryOut> = added.added.iter().map(EntryOut::from).collect();
        let out = serde_json::json!({
            "list": added.list,
            "added": entries,
            "skipped": added.skipped,
            "flagged": added.flagged,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "added {} entries to {}; {} images newly flagged",
        added.added.len(),
        added.list,
        added.flagged
    );
    for s in &added.skipped {
        println!("  skipped: {}: {}", s.source, s.reason);
    }
    Ok(())
}

/// Runs `matches`.
pub fn matches(a: MatchesArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Moderate)?;
    let found: Vec<Match> = engine.matches(&MatchParams {
        list: a.list.clone(),
        pdq_distance: a.pdq_distance,
        min_cosine: a.min_cosine,
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(());
    }
    println!("{} matches", found.len());
    for m in &found {
        println!(
            "{:>8}  {:4}  pdq {:>3}  cos {:>6}  {}/{}{}  {}",
            m.id.0,
            rule_name(m.rule),
            m.pdq_distance.map_or("-".into(), |d| d.to_string()),
            m.cosine.map_or("-".into(), |c| format!("{c:.3}")),
            m.list,
            m.entry,
            m.label
                .as_deref()
                .map_or(String::new(), |l| format!(" ({l})")),
            m.path
        );
    }
    Ok(())
}

fn rule_name(rule: crate::engine::MatchRule) -> &'static str {
    match rule {
        crate::engine::MatchRule::Pdq => "pdq",
        crate::engine::MatchRule::Itc => "itc",
        crate::engine::MatchRule::Both => "both",
    }
}

/// One flag as a line.
fn flag_line(f: &Flag) -> String {
    format!(
        "{}/{} by {} (pdq {}, cos {})",
        f.list,
        f.entry,
        rule_name(f.rule),
        f.pdq_distance.map_or("-".into(), |d| d.to_string()),
        f.cosine.map_or("-".into(), |c| format!("{c:.3}")),
    )
}

/// Runs `review` and `review decide`.
pub fn review(a: ReviewArgs) -> Result<()> {
    if let Some(ReviewCommand::Decide(d)) = a.decide {
        return decide(d);
    }
    let engine = open_existing(&a.index, Instead::Moderate)?;
    let page = engine.review_queue(a.list.as_deref(), a.offset, a.limit)?;
    if a.json {
        let items: Vec<serde_json::Value> = page
            .items
            .iter()
            .map(|i| {
                let entries: Vec<EntryOut> = i.entries.iter().map(EntryOut::from).collect();
                serde_json::json!({
                    "id": i.record.id,
                    "path": i.record.path,
                    "flags": i.flags,
                    "entries": entries,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "total": page.total, "items": items })
        );
        return Ok(());
    }
    println!("{} images wait for review", page.total);
    for i in &page.items {
        println!("{:>8}  {}", i.record.id.0, i.record.path);
        for f in &i.flags {
            let entry = i
                .entries
                .iter()
                .find(|e| e.list == f.list && e.id == f.entry);
            println!(
                "          {}{}",
                flag_line(f),
                entry.map_or(" (entry removed since)".into(), describe)
            );
        }
    }
    Ok(())
}

fn decide(d: DecideArgs) -> Result<()> {
    let engine = open_existing(&d.index, Instead::Moderate)?;
    let verdict = match d.verdict {
        VerdictArg::Confirmed => Verdict::Confirmed,
        VerdictArg::Cleared => Verdict::Cleared,
    };
    let before = engine
        .get(ImageId(d.id))?
        .map_or(0, |r| r.flags.iter().filter(|f| f.pending()).count());
    let record = engine.decide(ImageId(d.id), verdict, &d.note, ACTOR)?;
    let word = match verdict {
        Verdict::Confirmed => "confirmed",
        Verdict::Cleared => "cleared",
    };
    println!(
        "image {}: {} flag(s) {word} ({})",
        record.id.0, before, record.path
    );
    Ok(())
}

/// Runs `audit`.
pub fn audit(a: AuditArgs) -> Result<()> {
    let engine = open_existing(&a.index, Instead::Moderate)?;
    let mut after = a.after;
    let mut left = a.limit.unwrap_or(usize::MAX);
    let mut all: Vec<AuditEntry> = Vec::new();
    while left > 0 {
        let page = engine.audit(after, left.min(10_000))?;
        let Some(last) = page.last() else {
            break;
        };
        after = last.seq;
        left -= page.len();
        if a.json {
            all.extend(page);
        } else {
            for e in &page {
                println!(
                    "{:>6}  {}  {:<14}  {:<12}  {}",
                    e.seq,
                    e.time,
                    e.actor,
                    e.action,
                    serde_json::Value::Object(e.details.clone())
                );
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&all)?);
    }
    Ok(())
}
