//! Full-text search over captions, given texts, product titles and descriptions, and file names
//! (tantivy, directory `text/`).
//!
//! One document per image: `id` (u64, indexed + fast + stored), and five text fields analysed
//! with tantivy's `en_stem` analyser (split on non-alphanumerics, lowercase, drop tokens over 40
//! bytes, English Snowball stemming), indexed with positions so that quoted phrases work:
//! - `caption`: the kept captions ([`ImageRecord::kept_captions`]);
//! - `given`: texts supplied with the image;
//! - `title`, `description`: the title and description of the image's product
//!   ([`ImageRecord::product`]), indexed whatever CapFilt said of them: a merchant's text is
//!   trusted;
//! - `filename`: the words of the file name ([`filename_words`]).
//!
//! An index with other fields (made by another version) is recreated empty at open, and the
//! collection rebuilds it from sled (see [`TextIndex::open`]).
//!
//! Text is not stored here: sled has it. Scores are BM25 summed over the fields with
//! [`TextBoosts`]. Queries are user text, parsed leniently: whatever does not parse is searched
//! as plain words. Only a query past the parser's bounds ([`check_query`]: length, nesting,
//! number of terms) is refused, because tantivy's parser recurses once per nesting level and a
//! deep query would overflow the stack of the thread that parses it.
//!
//! The generation of each commit is saved in tantivy's commit payload, so that the collection
//! can tell whether the index is in step with sled.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tantivy::collector::{FilterCollector, TopDocs};
use tantivy::query::QueryParser;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::error::{IndexError, Result};
use super::id::ImageId;
use super::record::ImageRecord;

const WRITER_HEAP_BYTES: usize = 64 << 20;

/// Which document ids a search may return (see [`TextIndex::search_where`]).
pub type IdPredicate = std::sync::Arc<dyn Fn(u64) -> bool + Send + Sync>;

/// Longest query parsed, in bytes.
pub const MAX_QUERY_BYTES: usize = 2000;
/// Deepest nesting of parentheses in a query.
pub const MAX_QUERY_DEPTH: usize = 8;
/// Most words and operators in a query (each word becomes a clause on each of the five fields).
pub const MAX_QUERY_TERMS: usize = 256;

/// Checks a user query against the parser's bounds: at most [`MAX_QUERY_BYTES`] bytes,
/// [`MAX_QUERY_DEPTH`] levels of parentheses and [`MAX_QUERY_TERMS`] words. Depth is counted
/// over every `(`, quoted or not, which can only overestimate what the parser recurses into.
pub fn check_query(query: &str) -> Result<()> {
    let refuse = |why: String| Err(IndexError::InvalidQuery(why));
    if query.len() > MAX_QUERY_BYTES {
        return refuse(format!(
            "the query is {} bytes, over the limit of {MAX_QUERY_BYTES}",
            query.len()
        ));
    }
    let (mut depth, mut deepest) = (0usize, 0usize);
    for c in query.chars() {
        match c {
            '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_QUERY_DEPTH {
        return refuse(format!(
            "the query nests parentheses {deepest} deep, over the limit of {MAX_QUERY_DEPTH}"
        ));
    }
    let terms = query.split_whitespace().count();
    if terms > MAX_QUERY_TERMS {
        return refuse(format!(
            "the query has {terms} words, over the limit of {MAX_QUERY_TERMS}"
        ));
    }
    Ok(())
}

/// Per-field BM25 multipliers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TextBoosts {
    /// Kept captions (generated, filtered by ITM).
    pub caption: f32,
    /// Texts supplied by the user: the most deliberate description of an image.
    pub given: f32,
    /// A product's title (2.0 by default): a few words the merchant chose to name the product,
    /// so a query word found there says more than anywhere else, and a product whose title has
    /// the word ranks above one that only mentions it in its description.
    #[serde(default = "default_title_boost")]
    pub title: f32,
    /// A product's description (1.0 by default): trusted like the title, but long and
    /// discursive (materials, care, what it goes with), so a word in it is weaker evidence,
    /// weighted like a caption.
    #[serde(default = "default_description_boost")]
    pub description: f32,
    /// File-name words: often meaningful, often camera noise (`img`, `dsc`).
    pub filename: f32,
}

fn default_title_boost() -> f32 {
    2.0
}

fn default_description_boost() -> f32 {
    1.0
}

impl Default for TextBoosts {
    fn default() -> Self {
        TextBoosts {
            caption: 1.0,
            given: 1.5,
            title: default_title_boost(),
            description: default_description_boost(),
            filename: 0.7,
        }
    }
}

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    caption: Field,
    given: Field,
    title: Field,
    description: Field,
    filename: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("en_stem")
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let id = b.add_u64_field("id", INDEXED | FAST | STORED);
    let caption = b.add_text_field("caption", text.clone());
    let given = b.add_text_field("given", text.clone());
    let title = b.add_text_field("title", text.clone());
    let description = b.add_text_field("description", text.clone());
    let filename = b.add_text_field("filename", text);
    (
        b.build(),
        Fields {
            id,
            caption,
            given,
            title,
            description,
            filename,
        },
    )
}

#[derive(Serialize, Deserialize)]
struct Payload {
    generation: u64,
}

/// The tantivy index of a collection.
pub struct TextIndex {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    writer: IndexWriter<TantivyDocument>,
    fields: Fields,
    boosts: TextBoosts,
}

impl TextIndex {
    /// Opens the index in `dir`, creating it if missing.
    ///
    /// An index that cannot be opened or has another schema (other fields, as made by a version
    /// before the product fields) is wiped and recreated empty (its [`TextIndex::generation`] is
    /// then `None`): it is derived data, and the collection rebuilds it from sled.
    pub fn open(dir: &Path) -> Result<Self> {
        fs_err::create_dir_all(dir)?;
        let (schema, fields) = schema();
        let index = if dir.join("meta.json").exists() {
            match Index::open_in_dir(dir) {
                Ok(index) if index.schema() == schema => index,
                Ok(_) => {
                    tracing::warn!(dir = %dir.display(), "text index has another schema; recreating");
                    wipe(dir)?;
                    Index::create_in_dir(dir, schema)?
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "text index unreadable; recreating");
                    wipe(dir)?;
                    Index::create_in_dir(dir, schema)?
                }
            }
        } else {
            Index::create_in_dir(dir, schema)?
        };
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let writer = index.writer_with_num_threads(1, WRITER_HEAP_BYTES)?;
        Ok(TextIndex {
            dir: dir.to_path_buf(),
            index,
            reader,
            writer,
            fields,
            boosts: TextBoosts::default(),
        })
    }

    /// Changes the field boosts used by [`TextIndex::search`].
    pub fn set_boosts(&mut self, boosts: TextBoosts) {
        self.boosts = boosts;
    }

    /// Generation recorded by the last commit; `None` for a new or recreated index.
    pub fn generation(&self) -> Result<Option<u64>> {
        let metas = self.index.load_metas()?;
        Ok(metas
            .payload
            .and_then(|p| serde_json::from_str::<Payload>(&p).ok())
            .map(|p| p.generation))
    }

    /// Indexes `record`, replacing any document with the same id (visible after commit).
    pub fn upsert(&mut self, record: &ImageRecord) -> Result<()> {
        let f = self.fields;
        self.writer
            .delete_term(Term::from_field_u64(f.id, record.id.0));
        let mut doc = TantivyDocument::default();
        doc.add_u64(f.id, record.id.0);
        for caption in record.kept_captions() {
            doc.add_text(f.caption, caption);
        }
        for given in &record.given_texts {
            doc.add_text(f.given, given);
        }
        if let Some(product) = &record.product {
            if let Some(title) = &product.title {
                doc.add_text(f.title, title);
            }
            if let Some(description) = &product.description {
                doc.add_text(f.description, description);
            }
        }
        doc.add_text(f.filename, filename_words(&record.path));
        self.writer.add_document(doc)?;
        Ok(())
    }

    /// Deletes the document of `id`, if any (visible after commit).
    pub fn delete(&mut self, id: ImageId) {
        self.writer
            .delete_term(Term::from_field_u64(self.fields.id, id.0));
    }

    /// Deletes every document (visible after commit): the first step of a rebuild.
    pub fn clear(&mut self) -> Result<()> {
        self.writer.delete_all_documents()?;
        Ok(())
    }

    /// Makes all changes durable and visible, recording `generation` in the commit.
    pub fn commit(&mut self, generation: u64) -> Result<()> {
        let payload = serde_json::to_string(&Payload { generation })?;
        let mut prepared = self.writer.prepare_commit()?;
        prepared.set_payload(&payload);
        prepared.commit()?;
        self.reader.reload()?;
        Ok(())
    }

    /// Number of (committed, not deleted) documents.
    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// The `k` best documents for the user query `query`, as (id, BM25 score), best first.
    ///
    /// Tantivy query syntax is honoured where it parses (`"a phrase"`, `+must`, `-not`,
    /// `caption:dog`); whatever does not parse is searched as plain words. A query past the
    /// bounds of [`check_query`] is an [`IndexError::InvalidQuery`].
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<(ImageId, f32)>> {
        self.search_where(query, k, None)
    }

    /// [`TextIndex::search`] among the documents whose id passes `allowed` (applied while
    /// collecting, so `k` hits come back whenever `k` allowed documents match).
    pub fn search_where(
        &self,
        query: &str,
        k: usize,
        allowed: Option<IdPredicate>,
    ) -> Result<Vec<(ImageId, f32)>> {
        check_query(query)?;
        if k == 0 || query.trim().is_empty() {
            return Ok(Vec::new());
        }
        let f = self.fields;
        let mut parser = QueryParser::for_index(
            &self.index,
            vec![f.caption, f.given, f.title, f.description, f.filename],
        );
        parser.set_field_boost(f.caption, self.boosts.caption);
        parser.set_field_boost(f.given, self.boosts.given);
        parser.set_field_boost(f.title, self.boosts.title);
        parser.set_field_boost(f.description, self.boosts.description);
        parser.set_field_boost(f.filename, self.boosts.filename);
        let (query, _errors) = parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        let top_docs = TopDocs::with_limit(k).order_by_score();
        let top = match allowed {
            None => searcher.search(&query, &top_docs)?,
            Some(allowed) => searcher.search(
                &query,
                &FilterCollector::new("id".to_string(), move |id: u64| allowed(id), top_docs),
            )?,
        };
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let ids = searcher
                .segment_reader(addr.segment_ord)
                .fast_fields()
                .u64("id")?;
            if let Some(id) = ids.first(addr.doc_id) {
                hits.push((ImageId(id), score));
            }
        }
        Ok(hits)
    }

    /// Bytes used on disk.
    pub fn bytes_on_disk(&self) -> Result<u64> {
        super::fsutil::dir_size(&self.dir)
    }
}

/// Removes the files of a broken index directory (it holds nothing but the index).
fn wipe(dir: &Path) -> Result<()> {
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs_err::remove_dir_all(entry.path())?;
        } else {
            fs_err::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The words of a file name, for the `filename` field: the extension is dropped and the stem is
/// split at non-alphanumerics, lower-to-upper case changes and letter/digit changes, then
/// lowercased. `IMG_1234-beach_sunset.jpg` gives `img 1234 beach sunset`,
/// `BeachSunset2021.png` gives `beach sunset 2021`.
pub fn filename_words(path: &str) -> String {
    let name = path.rsplit(['/', '\\']).next().unwrap_or(path);
    let stem = match name.rfind('.') {
        Some(i) if i > 0 => &name[..i],
        _ => name,
    };
    let mut words: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut prev: Option<char> = None;
    for c in stem.chars() {
        if !c.is_alphanumeric() {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            prev = None;
            continue;
        }
        if let Some(p) = prev {
            let case_break = p.is_lowercase() && c.is_uppercase();
            let kind_break = p.is_numeric() != c.is_numeric();
            if (case_break || kind_break) && !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
        }
        current.extend(c.to_lowercase());
        prev = Some(c);
    }
    if !current.is_empty() {
        words.push(current);
    }
    words.join(" ")
}

/// Writes in `dir` an index with the fields an index had before the product fields (`id`,
/// `caption`, `given`, `filename`), holding `docs` as (id, caption), committed as `generation`:
/// what a collection made by an earlier version has.
#[cfg(test)]
pub(crate) fn write_index_without_product_fields(
    dir: &Path,
    generation: u64,
    docs: &[(u64, &str)],
) {
    let mut b = Schema::builder();
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("en_stem")
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let id = b.add_u64_field("id", INDEXED | FAST | STORED);
    let caption = b.add_text_field("caption", text.clone());
    b.add_text_field("given", text.clone());
    b.add_text_field("filename", text);
    let index = Index::create_in_dir(dir, b.build()).unwrap();
    let mut writer: IndexWriter<TantivyDocument> =
        index.writer_with_num_threads(1, WRITER_HEAP_BYTES).unwrap();
    for (n, text) in docs {
        let mut doc = TantivyDocument::default();
        doc.add_u64(id, *n);
        doc.add_text(caption, text);
        writer.add_document(doc).unwrap();
    }
    let mut prepared = writer.prepare_commit().unwrap();
    prepared.set_payload(&serde_json::to_string(&Payload { generation }).unwrap());
    prepared.commit().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::record::{Caption, CaptionSource};

    fn record(id: u64, path: &str, captions: &[(&str, bool)], given: &[&str]) -> ImageRecord {
        ImageRecord {
            id: ImageId(id),
            path: path.into(),
            content_hash: format!("{id:064x}"),
            size_bytes: 1,
            width: 1,
            height: 1,
            mtime_unix: 0,
            exif_date: None,
            itc: vec![1.0],
            captions: captions
                .iter()
                .map(|(text, kept)| Caption {
                    text: (*text).into(),
                    source: CaptionSource::Beam,
                    p_match: None,
                    kept: *kept,
                })
                .collect(),
            given_texts: given.iter().map(|s| (*s).into()).collect(),
            added_unix: 0,
            product: None,
            pdq: None,
            flags: Vec::new(),
        }
    }

    #[test]
    fn filename_words_split_like_people_name_files() {
        assert_eq!(
            filename_words("/x/IMG_1234-beach_sunset.jpg"),
            "img 1234 beach sunset"
        );
        assert_eq!(filename_words("BeachSunset2021.png"), "beach sunset 2021");
        assert_eq!(filename_words("C:\\pics\\DSC01234.JPG"), "dsc 01234");
        assert_eq!(filename_words(".hidden"), "hidden");
        assert_eq!(
            filename_words("Ünïcode Straße.tar.gz"),
            "ünïcode straße tar"
        );
        assert_eq!(filename_words("---.jpg"), "");
    }

    fn ids(hits: &[(ImageId, f32)]) -> Vec<u64> {
        hits.iter().map(|(id, _)| id.0).collect()
    }

    #[test]
    fn search_stems_boosts_deletes_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut index = TextIndex::open(dir.path()).unwrap();
            assert_eq!(index.generation().unwrap(), None);
            index
                .upsert(&record(
                    1,
                    "/p/IMG_1.jpg",
                    &[("two dogs running on a beach", true)],
                    &[],
                ))
                .unwrap();
            index
                .upsert(&record(
                    2,
                    "/p/2.jpg",
                    &[("a cat sleeping", true), ("a dog", false)],
                    &[],
                ))
                .unwrap();
            index
                .upsert(&record(
                    3,
                    "/p/beach_sunset.jpg",
                    &[("an orange sky", true)],
                    &["holiday in Spain"],
                ))
                .unwrap();
            index.commit(1).unwrap();
            assert_eq!(index.num_docs(), 3);

            // Stemming: "dog runs" matches "dogs running"; the rejected caption of 2 is not indexed.
            assert_eq!(ids(&index.search("dog runs", 10).unwrap()), vec![1]);
            // Given texts and file names are searched.
            assert_eq!(ids(&index.search("holidays", 10).unwrap()), vec![3]);
            assert_eq!(ids(&index.search("sunset", 10).unwrap()), vec![3]);
            // Caption beats file name for the same word (boost 1.0 vs 0.7).
            let beach = index.search("beach", 10).unwrap();
            assert_eq!(ids(&beach), vec![1, 3]);
            assert!(beach[0].1 > beach[1].1);
            // Phrases.
            assert_eq!(ids(&index.search("\"orange sky\"", 10).unwrap()), vec![3]);
            assert!(index.search("\"sky orange\"", 10).unwrap().is_empty());
            // Upsert replaces.
            index
                .upsert(&record(
                    2,
                    "/p/2.jpg",
                    &[("a cat sleeping", true), ("a dog", true)],
                    &[],
                ))
                .unwrap();
            index.delete(ImageId(3));
            index.commit(2).unwrap();
            assert_eq!(index.num_docs(), 2);
            assert_eq!(ids(&index.search("dog", 10).unwrap()).len(), 2);
            assert!(index.search("holiday", 10).unwrap().is_empty());
        }
        let index = TextIndex::open(dir.path()).unwrap();
        assert_eq!(index.generation().unwrap(), Some(2));
        assert_eq!(index.num_docs(), 2);
        assert_eq!(ids(&index.search("cat", 10).unwrap()), vec![2]);
        assert_eq!(index.search("cat", 0).unwrap(), vec![]);
    }

    /// An index holding one image captioned "a red car" (id 1), and its directory.
    fn one_red_car() -> (tempfile::TempDir, TextIndex) {
        let dir = tempfile::tempdir().unwrap();
        let mut index = TextIndex::open(dir.path()).unwrap();
        index
            .upsert(&record(1, "/p/a.jpg", &[("a red car", true)], &[]))
            .unwrap();
        index.commit(1).unwrap();
        (dir, index)
    }

    #[test]
    fn no_user_input_is_an_error() {
        let (_dir, index) = one_red_car();
        for q in [
            "",
            "   ",
            "\"",
            "((",
            "car)",
            "caption:",
            "nosuchfield:car",
            "AND",
            "OR OR",
            "+",
            "-",
            "*",
            "car^",
            "car^abc",
            "[1 TO",
            "id:abc",
            "id:>5",
            "\\",
            "car~",
            "🙂",
            "c\u{0}ar",
            "a:b:c",
            "'",
            "{}",
            "NOT car",
            "red AND",
            "+car -red",
        ] {
            index
                .search(q, 5)
                .unwrap_or_else(|e| panic!("query {q:?} failed: {e}"));
        }
        assert_eq!(ids(&index.search("red car)", 5).unwrap()), vec![1]);
    }

    /// Each of these overflowed the parsing thread's stack (or could) before the bounds; now
    /// each is refused with a clear error, and queries just inside the bounds still run.
    #[test]
    fn queries_past_the_bounds_are_refused_not_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let index = TextIndex::open(dir.path()).unwrap();
        let deep = MAX_QUERY_DEPTH + 1;
        for q in [
            "(".repeat(800),
            "(".repeat(5000),
            format!("+{}", "(".repeat(deep)),
            format!("{}car{}", "(".repeat(deep), ")".repeat(deep)),
            format!("\"{}\"", "(".repeat(deep)),
            vec!["car"; MAX_QUERY_TERMS + 1].join(" AND "),
            "a".repeat(MAX_QUERY_BYTES + 1),
        ] {
            match index.search(&q, 5) {
                Err(IndexError::InvalidQuery(m)) => assert!(m.contains("limit"), "{m}"),
                other => panic!("{:?}...: {other:?}", &q[..20.min(q.len())]),
            }
        }
        for q in [
            format!(
                "{}car{}",
                "(".repeat(MAX_QUERY_DEPTH),
                ")".repeat(MAX_QUERY_DEPTH)
            ),
            format!("+{}red", "(".repeat(MAX_QUERY_DEPTH)),
            vec!["car"; MAX_QUERY_TERMS / 2].join(" AND "),
            "[a TO z] {1 TO 5} \"x y\"~2 car^2 -red +blue".to_string(),
        ] {
            index.search(&q, 5).unwrap();
        }
    }

    /// Any string made of the query language's characters and words either searches or is
    /// refused with `InvalidQuery`: never a panic, never another error, never a stack overflow.
    #[test]
    fn any_query_searches_or_is_refused() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let (_dir, index) = one_red_car();
        let piece = prop_oneof![
            Just("(".to_string()),
            Just(")".to_string()),
            Just(" AND ".to_string()),
            Just(" OR ".to_string()),
            Just("NOT ".to_string()),
            Just(" TO ".to_string()),
            "[-+\"\\[\\]{}:^~*' ]{1,3}",
            "[a-z0-9]{1,8}",
            "\\PC{1,4}",
        ];
        let mut runner = TestRunner::new_with_rng(
            Config::with_cases(512),
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        );
        runner
            .run(&proptest::collection::vec(piece, 0..600), |parts| {
                let q: String = parts.concat();
                match index.search(&q, 5) {
                    Ok(_) | Err(IndexError::InvalidQuery(_)) => Ok(()),
                    Err(e) => Err(TestCaseError::fail(format!("{q:?}: {e}"))),
                }
            })
            .unwrap();
    }

    /// An image of a product titled `title` and described by `description`, whose captions of
    /// those texts CapFilt rejected.
    fn product_image(id: u64, title: &str, description: &str) -> ImageRecord {
        let mut r = record(id, &format!("/p/{id}.jpg"), &[("a photo", true)], &[]);
        for (text, source) in [
            (title, CaptionSource::Title),
            (description, CaptionSource::Description),
        ] {
            r.captions.push(Caption {
                text: text.into(),
                source,
                p_match: Some(0.1),
                kept: false,
            });
        }
        r.product = Some(crate::index::Product {
            id: format!("SKU-{id}"),
            title: Some(title.into()),
            description: Some(description.into()),
            ..Default::default()
        });
        r
    }

    #[test]
    fn product_texts_are_indexed_whatever_capfilt_said_and_titles_weigh_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = TextIndex::open(dir.path()).unwrap();
        index
            .upsert(&product_image(
                1,
                "Trail runner",
                "A light shoe in red canvas",
            ))
            .unwrap();
        index
            .upsert(&product_image(
                2,
                "Canvas tote",
                "A bag for the trail and the town",
            ))
            .unwrap();
        index.commit(1).unwrap();
        // Found through the product fields although their captions were rejected.
        assert_eq!(ids(&index.search("shoes", 10).unwrap()), vec![1]);
        assert_eq!(ids(&index.search("tote", 10).unwrap()), vec![2]);
        // The same word in a title (2.0) outranks it in a description (1.0), both ways round.
        let trail = index.search("trail", 10).unwrap();
        assert_eq!(ids(&trail), vec![1, 2]);
        assert!(trail[0].1 > trail[1].1, "{trail:?}");
        assert_eq!(ids(&index.search("canvas", 10).unwrap()), vec![2, 1]);
        // The fields can be named in a query.
        assert_eq!(
            ids(&index.search("description:trail", 10).unwrap()),
            vec![2]
        );
        assert_eq!(ids(&index.search("title:trail", 10).unwrap()), vec![1]);
    }

    #[test]
    fn an_index_of_another_schema_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        write_index_without_product_fields(dir.path(), 3, &[(1, "a red car")]);
        let index = TextIndex::open(dir.path()).unwrap();
        assert_eq!(
            index.generation().unwrap(),
            None,
            "so the collection rebuilds it"
        );
        assert_eq!(index.num_docs(), 0);
    }

    #[test]
    fn a_broken_index_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut index = TextIndex::open(dir.path()).unwrap();
            index
                .upsert(&record(1, "/p/a.jpg", &[("a red car", true)], &[]))
                .unwrap();
            index.commit(4).unwrap();
        }
        std::fs::write(dir.path().join("meta.json"), b"{ not json").unwrap();
        let index = TextIndex::open(dir.path()).unwrap();
        assert_eq!(index.generation().unwrap(), None);
        assert_eq!(index.num_docs(), 0);
    }
}
