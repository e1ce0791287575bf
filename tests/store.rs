//! The contract of the `Store` trait, written once against the trait: every store runs the same
//! suite (the embedded `Collection`, and `MilvusStore` on a Milvus Lite server; a store adds one
//! `#[test]` that calls [`contract`] with its own opener).
//!
//! What it checks: an id names one content (a counting store never gives one twice; a store with
//! ids from content gives the same content its id back); insert refuses a known path, content
//! hash or id without writing anything; get/by_path/by_hash/under/contains/len agree; update
//! changes texts and fields but never the vector; delete hides an image from both searches at
//! once; both searches with a filter return exactly the images `Filter::accepts` accepts (on a
//! collection small enough that vector search is exact); exclusions are remembered durably;
//! commit makes everything survive a reopen.
//!
//! The catalogue part ([`catalogue_contract`]) checks products: every kind of attribute filter
//! (keyword, alternatives, prefix, number ranges open and closed, bool, date ranges), alone and
//! with the other filters, on both searches, agreeing with `Filter::accepts`, including a value
//! written to break out of a Milvus string literal; `products_of` and `product_images` after
//! updates and deletes; the attribute schema kept across a reopen and refusing a conflicting
//! type without change; product titles and descriptions found by text search, a title above a
//! description for the same word.
//!
//! The moderation part ([`moderation_contract`]) checks match lists and flags: lists created
//! once under a possible name, entries added (a batch naming a missing list writes nothing),
//! replaced by id, listed by list then id, counted, removed, deleted with their list and not
//! resurrected by a new list of the same name, all kept across a reopen (an empty list too);
//! flag filters (any list, one list, pending only, a cleared flag counting for nothing, with
//! other filters) on both searches and `matching`, agreeing with `Filter::accepts`, before and
//! after updates that change flags; a list name no list can have refused in a filter; records
//! keeping their PDQ hash and flags; `pdq_hashes` agreeing with the records. Reads of thousands
//! of rows page through all of them in id order (the selective-filter test).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use blipsearch::index::{
    content_hash, entry_id, AttrFilter, AttrTest, AttrType, AttrValue, Caption, CaptionSource,
    Collection, CollectionInfo, Decision, Filter, Flag, FlagFilter, HnswParams, ImageId,
    ImageRecord, IndexError, ListEntry, MatchRule, MilvusStore, Pdq, PdqHash, Product, Schema,
    Store, Verdict,
};
use common::milvus::MilvusLite;

const DIM: usize = 16;
const WORDS: [&str; 6] = ["dog", "cat", "beach", "tree", "boat", "city"];
const FOLDERS: [&str; 4] = ["/lib/a/", "/lib/a/b/", "/lib/ab/", "/lib/c/"];

/// A small deterministic generator (xorshift), so the suite needs no RNG crate.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM)
            .map(|_| (self.next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        v.into_iter().map(|x| x / n).collect()
    }
}

fn record(n: u64, g: &mut Gen) -> ImageRecord {
    let folder = FOLDERS[(n % 4) as usize];
    let month = 1 + n % 12;
    ImageRecord {
        id: ImageId(u64::MAX),
        path: format!("{folder}img_{n}.jpg"),
        content_hash: content_hash(&n.to_le_bytes()),
        size_bytes: 1000 + n,
        width: 100 + (n % 7) as u32 * 50,
        height: 80 + (n % 5) as u32 * 40,
        mtime_unix: 1_700_000_000,
        exif_date: (!n.is_multiple_of(3))
            .then(|| format!("20{}:{month:02}:15 10:00:00", 19 + n % 3)),
        itc: g.unit(),
        captions: vec![Caption {
            text: format!(
                "a {} and a {} everyone",
                WORDS[(n % 6) as usize],
                WORDS[(n / 6 % 6) as usize]
            ),
            source: CaptionSource::Beam,
            p_match: Some(0.9),
            kept: true,
        }],
        given_texts: vec![],
        added_unix: 1_700_000_000,
        product: None,
        pdq: None,
        flags: Vec::new(),
    }
}

fn add(s: &mut dyn Store, mut r: ImageRecord) -> Result<ImageId, IndexError> {
    r.id = s.allocate_id(&r.content_hash)?;
    let id = r.id;
    s.insert(r)?;
    Ok(id)
}

fn filters() -> Vec<Filter> {
    let f = |path: Option<&str>, from: Option<&str>, to: Option<&str>, w, h| Filter {
        path_prefix: path.map(str::to_string),
        date_from: from.map(str::to_string),
        date_to: to.map(str::to_string),
        min_width: w,
        min_height: h,
        attributes: Vec::new(),
        flagged: None,
    };
    vec![
        f(Some("/lib/a/"), None, None, None, None),
        f(Some("/lib/a"), None, None, None, None),
        f(Some("/lib/a/b/"), None, None, None, None),
        f(Some("/nowhere/"), None, None, None, None),
        f(None, Some("2020-01-01"), Some("2020-12-31"), None, None),
        f(None, Some("2020-06-01"), None, None, None),
        f(None, None, Some("2019-03-31"), None, None),
        f(None, None, None, Some(250), None),
        f(None, None, None, None, Some(200)),
        f(
            Some("/lib/"),
            Some("2019-01-01"),
            None,
            Some(150),
            Some(120),
        ),
    ]
}

/// Every record in the store.
fn records(s: &dyn Store) -> Vec<ImageRecord> {
    let mut out = Vec::new();
    s.for_each(&mut |r| {
        out.push(r);
        Ok(())
    })
    .unwrap();
    out
}

fn ids(hits: &[(ImageId, f32)]) -> BTreeSet<u64> {
    hits.iter().map(|h| h.0 .0).collect()
}

/// Both searches with each filter return exactly (vector) or only (text) what the reference
/// meaning accepts.
fn filters_agree_with_accepts(s: &dyn Store, g: &mut Gen) {
    let all = records(s);
    for f in filters() {
        let want: BTreeSet<u64> = all
            .iter()
            .filter(|r| f.accepts(r))
            .map(|r| r.id.0)
            .collect();
        let got = ids(&s.vector_search(&g.unit(), all.len() + 5, None, &f).unwrap());
        assert_eq!(got, want, "vector search with {f:?}");
        // Every caption has "everyone": BM25 matches all, so the filter alone decides.
        let got = ids(&s.text_search("everyone", all.len() + 5, &f).unwrap());
        assert_eq!(got, want, "text search with {f:?}");
        if let Some(p) = &f.path_prefix {
            let under: BTreeSet<u64> = s.under(p).unwrap().iter().map(|x| x.0 .0).collect();
            let prefixed: BTreeSet<u64> = all
                .iter()
                .filter(|r| r.path.starts_with(p.as_str()))
                .map(|r| r.id.0)
                .collect();
            assert_eq!(under, prefixed, "under {p}");
        }
    }
    let bad = Filter {
        date_to: Some("2021-02-29".into()),
        ..Default::default()
    };
    assert!(matches!(
        s.vector_search(&g.unit(), 3, None, &bad),
        Err(IndexError::InvalidFilter(_))
    ));
    assert!(matches!(
        s.text_search("dog", 3, &bad),
        Err(IndexError::InvalidFilter(_))
    ));
}

/// The whole contract, against stores made by `open` (called again on the same directory to
/// reopen; the previous handle is dropped first).
pub fn contract(open: &dyn Fn(&Path) -> Box<dyn Store>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let everything = Filter::default();
    let mut s = open(dir);
    assert_eq!(s.len().unwrap(), 0);
    assert!(s.is_empty().unwrap());
    assert_eq!(s.info().embedding_dim, DIM);

    // Ids: one per content.
    let mut ids_given = Vec::new();
    for n in 0..60 {
        ids_given.push(add(&mut *s, record(n, &mut g)).unwrap());
    }
    let distinct: BTreeSet<_> = ids_given.iter().collect();
    assert_eq!(distinct.len(), 60);
    assert_eq!(s.len().unwrap(), 60);

    // Insert refuses a known path, hash or id, and an unallocated id, writing nothing.
    let first = s.get(ids_given[0]).unwrap().unwrap();
    let mut dup = record(1000, &mut g);
    dup.path = first.path.clone();
    assert!(matches!(
        add(&mut *s, dup),
        Err(IndexError::AlreadyExists { kind: "path", .. })
    ));
    let mut dup = record(1001, &mut g);
    dup.content_hash = first.content_hash.clone();
    assert!(matches!(
        add(&mut *s, dup),
        Err(IndexError::AlreadyExists {
            kind: "content hash",
            ..
        })
    ));
    let mut dup = record(1002, &mut g);
    dup.id = ids_given[1];
    assert!(s.insert(dup).is_err());
    let mut wild = record(1003, &mut g);
    wild.id = ImageId(s.next_id().unwrap().map_or(12_345, |n| n.0 + 1000));
    assert!(s.insert(wild).is_err());
    let mut zero = record(1004, &mut g);
    zero.itc = vec![0.0; DIM];
    assert!(add(&mut *s, zero).is_err());
    assert_eq!(s.len().unwrap(), 60);

    // Lookups agree.
    for &id in &ids_given {
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.id, id);
        assert_eq!(s.by_path(&r.path).unwrap(), Some(id));
        assert_eq!(s.by_hash(&r.content_hash).unwrap(), Some(id));
        assert!(s.contains(id).unwrap());
        // Its own vector finds it first.
        assert_eq!(
            s.vector_search(&r.itc, 1, None, &everything).unwrap()[0].0,
            id
        );
    }
    // Batches: ids for several contents at once, several records at once; a batch with a
    // known path is refused.
    let batch: Vec<ImageRecord> = (5000..5003).map(|n| record(n, &mut g)).collect();
    let hashes: Vec<&str> = batch.iter().map(|r| r.content_hash.as_str()).collect();
    let batch_ids = s.allocate_ids(&hashes).unwrap();
    assert_eq!(batch_ids.iter().collect::<BTreeSet<_>>().len(), 3);
    assert!(batch_ids.iter().all(|id| !ids_given.contains(id)));
    let batch: Vec<ImageRecord> = batch
        .into_iter()
        .zip(&batch_ids)
        .map(|(mut r, id)| {
            r.id = *id;
            r
        })
        .collect();
    let mut clash = batch[2].clone();
    clash.path = first.path.clone();
    assert!(matches!(
        s.insert_all(vec![clash]),
        Err(IndexError::AlreadyExists { kind: "path", .. })
    ));
    s.insert_all(batch.clone()).unwrap();
    for r in &batch {
        assert_eq!(s.get(r.id).unwrap().as_ref(), Some(r));
        assert_eq!(s.delete(r.id).unwrap().as_ref(), Some(r));
    }
    assert_eq!(s.len().unwrap(), 60);
    assert!(s.get(ImageId(999_999)).unwrap().is_none());
    assert!(!s.contains(ImageId(999_999)).unwrap());
    s.commit().unwrap();
    filters_agree_with_accepts(&*s, &mut g);

    // Update: texts and fields change, both searches see it; the vector cannot change.
    let mut r = s.get(ids_given[5]).unwrap().unwrap();
    r.given_texts.push("grandmother birthday".into());
    r.width = 4000;
    s.update(&r).unwrap();
    s.commit().unwrap();
    assert_eq!(
        s.text_search("birthday", 5, &everything).unwrap()[0].0,
        r.id
    );
    let wide = Filter {
        min_width: Some(4000),
        ..Default::default()
    };
    assert_eq!(
        ids(&s.vector_search(&g.unit(), 5, None, &wide).unwrap()),
        [r.id.0].into()
    );
    r.itc = g.unit();
    assert!(s.update(&r).is_err());
    let mut ghost = record(2000, &mut g);
    ghost.id = ImageId(999_999);
    assert!(s.update(&ghost).is_err());

    // Delete: gone from both searches at once, before any commit; its id is never given again.
    let gone = [ids_given[2], ids_given[7], ids_given[11]];
    for &id in &gone {
        let r = s.delete(id).unwrap().expect("it existed");
        assert_eq!(r.id, id);
        assert!(s.delete(id).unwrap().is_none());
        assert!(s.get(id).unwrap().is_none());
        assert!(s.by_path(&r.path).unwrap().is_none());
    }
    let check_gone = |s: &dyn Store, g: &mut Gen| {
        let v = ids(&s
            .vector_search(&g.unit(), 100, None, &Filter::default())
            .unwrap());
        let t = ids(&s.text_search("everyone", 100, &Filter::default()).unwrap());
        for id in gone {
            assert!(!v.contains(&id.0) && !t.contains(&id.0), "{id} came back");
        }
        let live = s.len().unwrap() as usize;
        assert_eq!((v.len(), t.len()), (live, live));
    };
    check_gone(&*s, &mut g);
    let fresh = add(&mut *s, record(3000, &mut g)).unwrap();
    assert!(ids_given.iter().all(|id| *id != fresh));
    s.delete(fresh).unwrap();
    filters_agree_with_accepts(&*s, &mut g);

    // Exclusions: remembered, listed, forgotten.
    assert!(!s.is_excluded("h1").unwrap());
    s.exclude("h1", "/lib/a/x.jpg").unwrap();
    s.exclude("h2", "/lib/a/y.jpg").unwrap();
    assert!(s.is_excluded("h1").unwrap());
    assert!(s.include("h2").unwrap());
    assert!(!s.include("h2").unwrap());
    assert_eq!(
        s.exclusions().unwrap(),
        vec![("h1".to_string(), "/lib/a/x.jpg".to_string())]
    );

    let next = s.next_id().unwrap();
    match next {
        // Reserved ids: inserting under an old id works once it is reserved.
        Some(next) => {
            s.reserve_ids(ImageId(next.0 + 10)).unwrap();
            let kept = record(4000, &mut g);
            assert!(s.allocate_id(&kept.content_hash).unwrap().0 >= next.0 + 10);
            let mut kept = kept;
            kept.id = ImageId(next.0 + 3);
            s.insert(kept).unwrap();
        }
        // Ids from content: removed content gets its id back, and nothing else gets it.
        None => {
            let again = record(2, &mut g);
            assert_eq!(s.allocate_id(&again.content_hash).unwrap(), gone[0]);
            add(&mut *s, record(4000, &mut g)).unwrap();
        }
    }
    s.commit().unwrap();
    let before = (records(&*s), s.stats().unwrap().images);
    assert_eq!(before.1, 58);
    drop(s);

    // Reopen: everything committed is there, searches agree.
    let s = open(dir);
    assert_eq!(records(&*s), before.0);
    if let Some(next) = next {
        assert!(s.next_id().unwrap().unwrap().0 > next.0 + 10);
    }
    check_gone(&*s, &mut g);
    filters_agree_with_accepts(&*s, &mut g);
    let stats = s.stats().unwrap();
    assert_eq!((stats.images, stats.pending), (58, 0));
    assert!(s.is_excluded("h1").unwrap() && !s.is_excluded("h2").unwrap());
}

/// The catalogue's attribute types.
fn schema() -> Schema {
    [
        ("brand", AttrType::Keyword),
        ("color", AttrType::Keyword),
        ("category", AttrType::Keyword),
        ("price", AttrType::Number),
        ("in_stock", AttrType::Bool),
        ("released", AttrType::Date),
    ]
    .into_iter()
    .map(|(k, t)| (k.to_string(), t))
    .collect()
}

/// A brand written to end a Milvus string literal and match every row.
const INJECTION: &str = r#"x" or id > 0 or ""#;

/// A product: id, title, description, attributes.
fn product(id: &str, title: &str, description: &str, attrs: &[(&str, AttrValue)]) -> Product {
    Product {
        id: id.into(),
        title: (!title.is_empty()).then(|| title.to_string()),
        description: (!description.is_empty()).then(|| description.to_string()),
        attributes: attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

fn text(s: &str) -> AttrValue {
    AttrValue::Text(s.into())
}

/// The catalogue: products with their number of images. "trail" is in the title of `RUN` and
/// the description of `HIKE`; values sit on the edges of the filters below.
fn catalogue() -> Vec<(Product, usize)> {
    use AttrValue::{Bool, Number};
    vec![
        (
            product(
                "RUN",
                "Trail runner",
                "Light running shoe with a grippy sole",
                &[
                    ("brand", text("acme")),
                    ("color", text("red")),
                    ("category", text("shoes/running")),
                    ("price", Number(59.9)),
                    ("in_stock", Bool(true)),
                    ("released", text("2024-03-01")),
                ],
            ),
            3,
        ),
        (
            product(
                "HIKE",
                "Hiking boot",
                "Waterproof leather boot for the trail",
                &[
                    ("brand", text("zeta")),
                    ("color", text("brown")),
                    ("category", text("shoes/hiking")),
                    ("price", Number(120.0)),
                    ("in_stock", Bool(false)),
                    ("released", text("2023-10-15")),
                ],
            ),
            2,
        ),
        (
            product(
                "TOTE",
                "Canvas tote",
                "A bag for the town",
                &[
                    ("brand", text("acme")),
                    ("color", text("blue")),
                    ("category", text("bags/tote")),
                    ("price", Number(25.0)),
                    ("in_stock", Bool(true)),
                    ("released", text("2024-06-30")),
                ],
            ),
            2,
        ),
        (
            product(
                "ODD",
                "",
                "",
                &[
                    ("brand", text(INJECTION)),
                    ("color", text(r"red\blue")),
                    ("category", text("shoes0")),
                    ("price", Number(80.0)),
                    ("in_stock", Bool(true)),
                ],
            ),
            1,
        ),
        (
            product(
                "EDGE",
                "",
                "",
                &[
                    ("brand", text("80")),
                    ("category", text("shoes/")),
                    ("price", Number(-5.0)),
                    ("released", text("2024-01-01")),
                ],
            ),
            1,
        ),
        (product("BARE", "Gift card", "", &[]), 1),
    ]
}

/// Attribute filters in their string form (parsed with [`schema`]), each with whether it goes
/// with a path, size or date filter too.
fn attribute_filters() -> Vec<Filter> {
    let s = schema();
    let f = |attrs: &[&str]| Filter {
        attributes: attrs
            .iter()
            .map(|a| AttrFilter::parse(a, &s).unwrap())
            .collect(),
        ..Filter::default()
    };
    let injection = format!("brand:{INJECTION}");
    let mut out = vec![
        f(&["brand:acme"]),
        f(&["brand:80"]),
        f(&[&injection]),
        f(&[r#"brand:acme" or "1" == "1"#]),
        f(&[r"color:red\\blue"]),
        f(&["color:red|blue"]),
        f(&["color:green|brown|red"]),
        f(&["category:shoes/*"]),
        f(&["category:shoes/r*|bags/*"]),
        f(&["category:shoes"]),
        f(&["price:10..80"]),
        f(&["price:..59.9"]),
        f(&["price:60.."]),
        f(&["price:80"]),
        f(&["price:..0|100.."]),
        f(&["in_stock:true"]),
        f(&["in_stock:false"]),
        f(&["released:2024-01-01.."]),
        f(&["released:..2024-03-01"]),
        f(&["released:2024-01-01..2024-06-30"]),
        f(&["released:2023-10-15"]),
        f(&["brand:acme", "in_stock:true", "price:..30"]),
        f(&["category:shoes/*", "color:red"]),
    ];
    let mut with_path = f(&["brand:acme"]);
    with_path.path_prefix = Some("/lib/a".into());
    let mut with_size = f(&["in_stock:true"]);
    with_size.min_width = Some(200);
    let mut with_day = f(&["category:shoes/*"]);
    with_day.date_from = Some("2020-01-01".into());
    out.extend([with_path, with_size, with_day]);
    // An attribute no product has, and a test of another type than the values.
    out.push(Filter {
        attributes: vec![AttrFilter {
            name: "weight".into(),
            any_of: vec![AttrTest::Range {
                min: None,
                max: None,
            }],
        }],
        ..Filter::default()
    });
    out.push(Filter {
        attributes: vec![AttrFilter {
            name: "brand".into(),
            any_of: vec![
                AttrTest::Range {
                    min: Some(0.0),
                    max: None,
                },
                AttrTest::Equals(AttrValue::Bool(true)),
            ],
        }],
        ..Filter::default()
    });
    out
}

/// Both searches with each attribute filter return exactly what `Filter::accepts` accepts;
/// returns how many filters passed some image and how many passed none.
fn attribute_filters_agree_with_accepts(s: &dyn Store, g: &mut Gen) -> (usize, usize) {
    let all = records(s);
    let (mut some, mut none) = (0, 0);
    for f in attribute_filters() {
        let want: BTreeSet<u64> = all
            .iter()
            .filter(|r| f.accepts(r))
            .map(|r| r.id.0)
            .collect();
        let got = ids(&s.vector_search(&g.unit(), all.len() + 5, None, &f).unwrap());
        assert_eq!(got, want, "vector search with {f:?}");
        let got = ids(&s.text_search("everyone", all.len() + 5, &f).unwrap());
        assert_eq!(got, want, "text search with {f:?}");
        if want.is_empty() {
            none += 1;
        } else {
            some += 1;
        }
    }
    (some, none)
}

/// Products as each store reports them agree with the records.
fn products_agree_with_records(s: &dyn Store) {
    let all = records(s);
    let mut asked: Vec<ImageId> = all.iter().map(|r| r.id).rev().collect();
    asked.push(ImageId(999_999_999));
    let mut want: Vec<Option<Product>> = all.iter().map(|r| r.product.clone()).rev().collect();
    want.push(None);
    assert_eq!(s.products_of(&asked).unwrap(), want);
    let mut images: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
    for r in &all {
        if let Some(p) = &r.product {
            images.entry(p.id.clone()).or_default().push(r.id);
        }
    }
    for v in images.values_mut() {
        v.sort();
    }
    assert_eq!(s.product_images(None).unwrap(), images);
    let some = ["TOTE".to_string(), "RUN".to_string(), "NONE".to_string()];
    let want: BTreeMap<String, Vec<ImageId>> = images
        .iter()
        .filter(|(k, _)| some.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(s.product_images(Some(&some)).unwrap(), want);
    assert!(s.product_images(Some(&[])).unwrap().is_empty());
}

/// Products: filters, lookups, schema and product texts (see the module docs), against stores
/// made by `open` (called again on the same directory to reopen).
pub fn catalogue_contract(open: &dyn Fn(&Path) -> Box<dyn Store>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut g = Gen(0x5EED_CA7A_1065);
    let mut s = open(dir);

    // The schema: extended, kept as it is by a conflicting type.
    s.extend_schema(&schema()).unwrap();
    assert_eq!(s.info().attributes, schema());
    let conflict: Schema = [
        ("weight".to_string(), AttrType::Number),
        ("price".to_string(), AttrType::Keyword),
    ]
    .into();
    match s.extend_schema(&conflict) {
        Err(IndexError::InvalidParams(m)) => assert!(m.contains("price"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(s.info().attributes, schema());

    // Images: those of each product, and two with none.
    let mut n = 100;
    let mut by_product: BTreeMap<String, Vec<ImageId>> = BTreeMap::new();
    for (p, images) in catalogue() {
        for _ in 0..images {
            let mut r = record(n, &mut g);
            r.product = Some(p.clone());
            // Captions of the product texts, as ingest writes them: not indexed as captions.
            r.captions.push(Caption {
                text: "canvas".into(),
                source: CaptionSource::Title,
                p_match: Some(0.2),
                kept: false,
            });
            by_product
                .entry(p.id.clone())
                .or_default()
                .push(add(&mut *s, r).unwrap());
            n += 1;
        }
    }
    let plain: Vec<ImageId> = (0..2)
        .map(|i| add(&mut *s, record(200 + i, &mut g)).unwrap())
        .collect();
    s.commit().unwrap();
    let (some, none) = attribute_filters_agree_with_accepts(&*s, &mut g);
    assert!(
        some >= 20 && none >= 3,
        "{some} filters pass some image, {none} none"
    );
    products_agree_with_records(&*s);
    // The injection value matches its own product's image and nothing else.
    let injection = Filter {
        attributes: vec![AttrFilter::parse(&format!("brand:{INJECTION}"), &schema()).unwrap()],
        ..Filter::default()
    };
    assert_eq!(
        ids(&s.vector_search(&g.unit(), 50, None, &injection).unwrap()),
        by_product["ODD"].iter().map(|id| id.0).collect()
    );

    // Product texts: titles and descriptions are searched (whatever CapFilt said of their
    // captions, and only through the product: "canvas" is a rejected caption of every image);
    // a title outranks a description for the same word.
    let hits = |s: &dyn Store, q: &str| ids(&s.text_search(q, 50, &Filter::default()).unwrap());
    let of = |p: &str| {
        by_product[p]
            .iter()
            .map(|id| id.0)
            .collect::<BTreeSet<u64>>()
    };
    assert_eq!(hits(&*s, "runner"), of("RUN"));
    assert_eq!(hits(&*s, "waterproof"), of("HIKE"));
    assert_eq!(hits(&*s, "canvas"), of("TOTE"));
    let trail = s.text_search("trail", 50, &Filter::default()).unwrap();
    let order: Vec<ImageId> = trail.iter().map(|h| h.0).collect();
    assert_eq!(order.len(), 5, "{trail:?}");
    assert!(
        order[..3].iter().all(|id| by_product["RUN"].contains(id)),
        "title hits first: {trail:?}"
    );
    assert!(trail[2].1 > trail[3].1, "{trail:?}");

    // Updates: an image moves to another product, one loses its product, one gains one, and a
    // product's attributes and title change on all its images.
    let moved = by_product["RUN"][0];
    let mut r = s.get(moved).unwrap().unwrap();
    r.product = Some(catalogue()[2].0.clone());
    s.update(&r).unwrap();
    let lost = by_product["EDGE"][0];
    let mut r = s.get(lost).unwrap().unwrap();
    r.product = None;
    s.update(&r).unwrap();
    let mut r = s.get(plain[0]).unwrap().unwrap();
    r.product = Some(catalogue()[1].0.clone());
    s.update(&r).unwrap();
    for &id in by_product["HIKE"].iter().chain(&plain[..1]) {
        let mut r = s.get(id).unwrap().unwrap();
        let p = r.product.as_mut().unwrap();
        p.attributes.insert("price".into(), AttrValue::Number(75.0));
        p.attributes
            .insert("in_stock".into(), AttrValue::Bool(true));
        p.title = Some("Summit boot".into());
        s.update(&r).unwrap();
    }
    s.commit().unwrap();
    let images = s.product_images(None).unwrap();
    assert!(images["TOTE"].contains(&moved) && !images["RUN"].contains(&moved));
    assert!(!images.contains_key("EDGE"));
    assert!(images["HIKE"].contains(&plain[0]));
    assert_eq!(
        s.products_of(&[lost, moved]).unwrap(),
        [None, Some(catalogue()[2].0.clone())]
    );
    assert!(hits(&*s, "hiking").is_empty());
    assert_eq!(hits(&*s, "summit").len(), 3);
    attribute_filters_agree_with_accepts(&*s, &mut g);
    products_agree_with_records(&*s);

    // Deletes: gone from products and filters at once.
    let gone = by_product["ODD"][0];
    s.delete(gone).unwrap();
    s.delete(by_product["TOTE"][0]).unwrap();
    assert!(!s.product_images(None).unwrap().contains_key("ODD"));
    assert_eq!(s.products_of(&[gone]).unwrap(), [None]);
    assert!(ids(&s.vector_search(&g.unit(), 50, None, &injection).unwrap()).is_empty());
    attribute_filters_agree_with_accepts(&*s, &mut g);
    products_agree_with_records(&*s);
    s.commit().unwrap();
    let before = records(&*s);
    drop(s);

    // Reopen: the schema, the products and the filters are as they were; a new attribute
    // joins the schema durably.
    let mut s = open(dir);
    assert_eq!(s.info().attributes, schema());
    assert_eq!(records(&*s), before);
    attribute_filters_agree_with_accepts(&*s, &mut g);
    products_agree_with_records(&*s);
    assert!(s.extend_schema(&conflict).is_err());
    let weight: Schema = [("weight".to_string(), AttrType::Number)].into();
    s.extend_schema(&weight).unwrap();
    drop(s);
    let s = open(dir);
    let mut want = schema();
    want.insert("weight".into(), AttrType::Number);
    assert_eq!(s.info().attributes, want);
}

/// A flag of `list`, pending or with a verdict.
fn flag(list: &str, entry: u64, verdict: Option<Verdict>) -> Flag {
    Flag {
        list: list.into(),
        entry,
        rule: MatchRule::Pdq,
        pdq_distance: Some(3),
        cosine: None,
        flagged_unix: 1_700_000_100,
        decision: verdict.map(|verdict| Decision {
            verdict,
            note: "checked".into(),
            actor: "cli".into(),
            unix: 1_700_000_200,
        }),
    }
}

/// An entry of `list` with `hashes` PDQ hashes made from `n`, and maybe a vector.
fn entry(list: &str, n: u8, hashes: usize, itc: Option<Vec<f32>>) -> ListEntry {
    let pdq: Vec<PdqHash> = (0..hashes)
        .map(|i| PdqHash([n.wrapping_mul(9).wrapping_add(i as u8); 32]))
        .collect();
    ListEntry {
        list: list.into(),
        id: entry_id(list, pdq.first(), itc.as_deref()),
        label: Some(format!("reference {n}")),
        source: Some("bank.csv".into()),
        quality: (!pdq.is_empty()).then_some(90),
        pdq,
        itc,
        added_unix: 1_700_000_000,
    }
}

/// The flags of image `n` of the moderation suite: none, pending, confirmed and pending on two
/// lists, cleared only, cleared and confirmed.
fn flags_of(n: u64) -> Vec<Flag> {
    use Verdict::{Cleared, Confirmed};
    match n % 5 {
        0 => vec![],
        1 => vec![flag("bank", n, None)],
        2 => vec![flag("bank", n, Some(Confirmed)), flag("other", n, None)],
        3 => vec![flag("other", n, Some(Cleared))],
        _ => vec![
            flag("bank", n, Some(Cleared)),
            flag("other", n, Some(Confirmed)),
        ],
    }
}

fn flag_filters() -> Vec<Filter> {
    let f = |list: Option<&str>, pending_only| Filter {
        flagged: Some(FlagFilter {
            list: list.map(str::to_string),
            pending_only,
        }),
        ..Filter::default()
    };
    let mut out = vec![
        f(None, false),
        f(None, true),
        f(Some("bank"), false),
        f(Some("bank"), true),
        f(Some("other"), false),
        f(Some("other"), true),
        f(Some("nobody"), false),
    ];
    let mut with_path = f(Some("bank"), false);
    with_path.path_prefix = Some("/lib/a/".into());
    let mut with_size = f(None, false);
    with_size.min_width = Some(200);
    out.extend([with_path, with_size]);
    out
}

/// Both searches and `matching` with each flag filter return exactly what `Filter::accepts`
/// accepts; returns how many filters passed some image.
fn flag_filters_agree_with_accepts(s: &dyn Store, g: &mut Gen) -> usize {
    let all = records(s);
    let mut some = 0;
    for f in flag_filters() {
        let want: Vec<ImageId> = all.iter().filter(|r| f.accepts(r)).map(|r| r.id).collect();
        let want_set: BTreeSet<u64> = want.iter().map(|id| id.0).collect();
        let got = ids(&s.vector_search(&g.unit(), all.len() + 5, None, &f).unwrap());
        assert_eq!(got, want_set, "vector search with {f:?}");
        let got = ids(&s.text_search("everyone", all.len() + 5, &f).unwrap());
        assert_eq!(got, want_set, "text search with {f:?}");
        assert_eq!(s.matching(&f, usize::MAX).unwrap(), want, "matching {f:?}");
        assert_eq!(
            s.matching(&f, 2).unwrap(),
            want[..want.len().min(2)],
            "the first two matching {f:?}"
        );
        some += !want.is_empty() as usize;
    }
    let everyone: Vec<ImageId> = all.iter().map(|r| r.id).collect();
    assert_eq!(
        s.matching(&Filter::default(), usize::MAX).unwrap(),
        everyone
    );
    assert_eq!(s.matching(&Filter::default(), 3).unwrap(), everyone[..3]);
    assert!(s.matching(&Filter::default(), 0).unwrap().is_empty());
    let hashes: Vec<(ImageId, Pdq)> = all
        .iter()
        .filter_map(|r| r.pdq.map(|p| (r.id, p)))
        .collect();
    assert_eq!(s.pdq_hashes().unwrap(), hashes);
    some
}

/// Match lists, flags and PDQ hashes (see [`moderation_contract`]'s steps), against stores made
/// by `open` (called again on the same directory to reopen).
pub fn moderation_contract(open: &dyn Fn(&Path) -> Box<dyn Store>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut g = Gen(0x0DE7_A710_0F1A);
    let mut s = open(dir);

    // Lists: created once, by a possible name.
    assert!(s.lists().unwrap().is_empty());
    assert!(s.entries(None).unwrap().is_empty());
    let bank = s.create_list("bank").unwrap();
    assert_eq!((bank.name.as_str(), bank.entries), ("bank", 0));
    assert!(matches!(
        s.create_list("bank"),
        Err(IndexError::ListExists(n)) if n == "bank"
    ));
    for bad in ["", "Bank", "a b", "a/1", "\"x\" or 1"] {
        assert!(
            matches!(s.create_list(bad), Err(IndexError::InvalidName(_))),
            "{bad:?}"
        );
    }
    s.create_list("other").unwrap();
    s.create_list("empty").unwrap();
    let names = |s: &dyn Store| -> Vec<(String, u64)> {
        s.lists()
            .unwrap()
            .into_iter()
            .map(|l| (l.name, l.entries))
            .collect()
    };
    assert_eq!(
        names(&*s),
        [("bank".into(), 0), ("empty".into(), 0), ("other".into(), 0)]
    );

    // Entries: a list that does not exist anywhere in a batch writes nothing.
    let full = entry("bank", 1, 8, Some(g.unit()));
    let hash_only = entry("bank", 2, 1, None);
    let vector_only = entry("bank", 3, 0, Some(g.unit()));
    let elsewhere = entry("other", 4, 8, Some(g.unit()));
    let stray = entry("nope", 5, 1, None);
    assert!(matches!(
        s.add_entries(&[full.clone(), stray.clone()]),
        Err(IndexError::NoList(n)) if n == "nope"
    ));
    assert!(s.entries(Some("bank")).unwrap().is_empty());
    // Entries no store can keep.
    let mut nine = entry("bank", 6, 8, None);
    nine.pdq.push(PdqHash([0; 32]));
    let wrong_dim = entry("bank", 7, 1, Some(vec![1.0; DIM + 1]));
    let not_finite = entry("bank", 10, 1, Some(vec![f32::NAN; DIM]));
    let mut nothing = entry("bank", 8, 0, None);
    nothing.id = 42;
    let mut long_label = entry("bank", 9, 1, None);
    long_label.label = Some("x".repeat(5000));
    let mut wide_id = entry("bank", 11, 1, None);
    wide_id.id = 1 << 53;
    for bad in [nine, wrong_dim, not_finite, nothing, long_label, wide_id] {
        let what = format!("{bad:?}");
        assert!(
            matches!(
                s.add_entries(&[hash_only.clone(), bad]),
                Err(IndexError::InvalidParams(_))
            ),
            "{what}"
        );
    }
    assert!(s.entries(Some("bank")).unwrap().is_empty());

    // Added, listed by list then id, counted; the same id again replaces (also within a batch).
    s.add_entries(&[full.clone(), hash_only.clone(), elsewhere.clone()])
        .unwrap();
    let mut relabelled = hash_only.clone();
    relabelled.label = Some("relabelled".into());
    let mut first_try = vector_only.clone();
    first_try.label = None;
    s.add_entries(&[relabelled.clone(), first_try, vector_only.clone()])
        .unwrap();
    let mut bank_entries = vec![full.clone(), relabelled.clone(), vector_only.clone()];
    bank_entries.sort_by_key(|e| e.id);
    assert_eq!(s.entries(Some("bank")).unwrap(), bank_entries);
    let mut every = bank_entries.clone();
    every.push(elsewhere.clone());
    assert_eq!(s.entries(None).unwrap(), every);
    assert_eq!(
        names(&*s),
        [("bank".into(), 3), ("empty".into(), 0), ("other".into(), 1)]
    );

    // Removed once; a list that does not exist is an error, not an empty answer.
    assert_eq!(
        s.remove_entry("bank", vector_only.id).unwrap(),
        Some(vector_only.clone())
    );
    assert_eq!(s.remove_entry("bank", vector_only.id).unwrap(), None);
    assert_eq!(s.remove_entry("bank", elsewhere.id).unwrap(), None);
    assert!(matches!(
        s.remove_entry("nope", full.id),
        Err(IndexError::NoList(_))
    ));
    assert!(matches!(
        s.entries(Some("nope")),
        Err(IndexError::NoList(_))
    ));
    bank_entries.retain(|e| e.id != vector_only.id);
    assert_eq!(s.entries(Some("bank")).unwrap(), bank_entries);

    // Deleted with its entries; a list made again under its name starts empty.
    let gone = s.delete_list("other").unwrap().unwrap();
    assert_eq!((gone.name.as_str(), gone.entries), ("other", 1));
    assert_eq!(s.delete_list("other").unwrap(), None);
    assert!(matches!(
        s.add_entries(std::slice::from_ref(&elsewhere)),
        Err(IndexError::NoList(_))
    ));
    assert_eq!(s.entries(None).unwrap(), bank_entries);
    s.create_list("other").unwrap();
    assert!(s.entries(Some("other")).unwrap().is_empty());

    // Images with flags and hashes (some without a hash).
    let mut written = Vec::new();
    for n in 0..40u64 {
        let mut r = record(n, &mut g);
        r.flags = flags_of(n);
        r.pdq = (n % 7 != 0).then(|| Pdq {
            hash: PdqHash([n as u8; 32]),
            quality: (n * 2) as u8,
        });
        r.id = s.allocate_id(&r.content_hash).unwrap();
        written.push(r);
    }
    s.insert_all(written.clone()).unwrap();
    s.commit().unwrap();
    written.sort_by_key(|r| r.id);
    assert_eq!(records(&*s), written, "flags and hashes round-trip");
    let some = flag_filters_agree_with_accepts(&*s, &mut g);
    assert!(some >= 7, "{some} flag filters pass some image");
    for f in [
        FlagFilter {
            list: Some("Bank".into()),
            pending_only: false,
        },
        FlagFilter {
            list: Some(r#"bank" or id > 0 or ""#.into()),
            pending_only: true,
        },
    ] {
        let f = Filter {
            flagged: Some(f),
            ..Filter::default()
        };
        assert!(matches!(
            s.vector_search(&g.unit(), 3, None, &f),
            Err(IndexError::InvalidFilter(_))
        ));
        assert!(matches!(
            s.text_search("dog", 3, &f),
            Err(IndexError::InvalidFilter(_))
        ));
        assert!(matches!(
            s.matching(&f, 3),
            Err(IndexError::InvalidFilter(_))
        ));
    }

    // An update that changes flags changes what the filter passes, at once: an unflagged image
    // gets a pending flag, a pending one is cleared, a hash is taken away.
    let pending_other = Filter {
        flagged: Some(FlagFilter {
            list: Some("other".into()),
            pending_only: true,
        }),
        ..Filter::default()
    };
    let bank_any = Filter {
        flagged: Some(FlagFilter {
            list: Some("bank".into()),
            pending_only: false,
        }),
        ..Filter::default()
    };
    let mut unflagged = written.iter().find(|r| r.flags.is_empty()).unwrap().clone();
    let mut pending = written
        .iter()
        .find(|r| r.flags.len() == 1 && r.flags[0].pending())
        .unwrap()
        .clone();
    assert!(!s
        .matching(&pending_other, 100)
        .unwrap()
        .contains(&unflagged.id));
    assert!(s.matching(&bank_any, 100).unwrap().contains(&pending.id));
    unflagged.flags.push(flag("other", 99, None));
    pending.flags[0].decision = Some(Decision {
        verdict: Verdict::Cleared,
        note: "a false match".into(),
        actor: "key:0123abcd".into(),
        unix: 1_700_000_300,
    });
    pending.pdq = None;
    s.update_all(&[unflagged.clone(), pending.clone()]).unwrap();
    assert!(s
        .matching(&pending_other, 100)
        .unwrap()
        .contains(&unflagged.id));
    assert!(!s.matching(&bank_any, 100).unwrap().contains(&pending.id));
    assert!(
        !ids(&s.vector_search(&pending.itc, 50, None, &bank_any).unwrap()).contains(&pending.id.0)
    );
    assert_eq!(s.get(pending.id).unwrap().as_ref(), Some(&pending));
    assert!(!s.pdq_hashes().unwrap().iter().any(|h| h.0 == pending.id));
    s.commit().unwrap();
    flag_filters_agree_with_accepts(&*s, &mut g);

    // A deleted image leaves every flag filter and the hashes.
    let flagged_any = Filter {
        flagged: Some(FlagFilter::default()),
        ..Filter::default()
    };
    let victim = s.matching(&flagged_any, 1).unwrap()[0];
    s.delete(victim).unwrap();
    assert!(!s.matching(&flagged_any, 100).unwrap().contains(&victim));
    assert!(!s.pdq_hashes().unwrap().iter().any(|h| h.0 == victim));
    flag_filters_agree_with_accepts(&*s, &mut g);
    s.commit().unwrap();
    let before = (records(&*s), s.entries(None).unwrap(), s.lists().unwrap());
    drop(s);

    // Reopen: lists (the empty one too), entries, flags and hashes are as they were.
    let s = open(dir);
    assert_eq!(
        names(&*s),
        [("bank".into(), 2), ("empty".into(), 0), ("other".into(), 0)]
    );
    assert_eq!(
        (records(&*s), s.entries(None).unwrap(), s.lists().unwrap()),
        before
    );
    flag_filters_agree_with_accepts(&*s, &mut g);
}

#[test]
fn embedded_collection_keeps_the_moderation_contract() {
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    moderation_contract(&|dir| {
        Box::new(Collection::open(dir, &info, HnswParams::default()).unwrap()) as Box<dyn Store>
    });
}

#[test]
fn milvus_store_keeps_the_moderation_contract() {
    let milvus = MilvusLite::start();
    let address = milvus.address("moderation").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    moderation_contract(&|_dir| {
        Box::new(MilvusStore::open(&address, &info).unwrap()) as Box<dyn Store>
    });
}

#[test]
fn embedded_collection_keeps_the_catalogue_contract() {
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    catalogue_contract(&|dir| {
        Box::new(Collection::open(dir, &info, HnswParams::default()).unwrap()) as Box<dyn Store>
    });
}

#[test]
fn milvus_store_keeps_the_catalogue_contract() {
    let milvus = MilvusLite::start();
    let address = milvus.address("catalogue").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    catalogue_contract(&|_dir| {
        Box::new(MilvusStore::open(&address, &info).unwrap()) as Box<dyn Store>
    });
}

#[test]
fn embedded_collection_keeps_the_store_contract() {
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    contract(&|dir| {
        Box::new(Collection::open(dir, &info, HnswParams::default()).unwrap()) as Box<dyn Store>
    });
}

#[test]
fn milvus_store_keeps_the_store_contract() {
    let milvus = MilvusLite::start();
    let address = milvus.address("contract").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    contract(&|_dir| Box::new(MilvusStore::open(&address, &info).unwrap()) as Box<dyn Store>);
}

/// What `s` holds: every record, in id order.
fn snapshot(s: &dyn Store) -> Vec<ImageRecord> {
    records(s)
}

#[test]
fn milvus_killed_and_restarted_loses_nothing_and_the_store_recovers() {
    let mut milvus = MilvusLite::start();
    let address = milvus.address("crash").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    let mut s = MilvusStore::open(&address, &info).unwrap();
    let mut g = Gen(7);
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(add(&mut s, record(n, &mut g)).unwrap());
    }
    s.delete(ids[3]).unwrap();
    s.exclude("h1", "/lib/a/x.jpg").unwrap();
    s.commit().unwrap();
    let before = snapshot(&s);
    assert_eq!(before.len(), 39);

    milvus.kill();
    // While Milvus is down, every call says so, as `Unavailable` (an HTTP 503 upstream).
    match s.len() {
        Err(IndexError::Unavailable(m)) => assert!(m.contains("does not answer"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        s.vector_search(&g.unit(), 3, None, &Filter::default()),
        Err(IndexError::Unavailable(_))
    ));

    milvus.restart();
    // The same handle recovers once Milvus is back (reconnecting, loading the collection).
    let start = Instant::now();
    loop {
        match s.len() {
            Ok(n) => {
                assert_eq!(n, 39);
                break;
            }
            Err(IndexError::Unavailable(_)) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the store did not recover: {e}"),
        }
    }
    assert_eq!(snapshot(&s), before);
    assert!(s.is_excluded("h1").unwrap());
    let hits = s
        .vector_search(&before[0].itc, 1, None, &Filter::default())
        .unwrap();
    assert_eq!(hits[0].0, before[0].id);
    assert_eq!(
        s.text_search("everyone", 100, &Filter::default())
            .unwrap()
            .len(),
        39
    );
    // A new handle sees the same.
    drop(s);
    let s = MilvusStore::open_existing(&address).unwrap();
    assert_eq!(snapshot(&s), before);
}

/// A Milvus collection holding rows written before products were stored (no `product`, `attrs`
/// or `attr_days` keys, nor moderation's) keeps working beside new rows: the old rows are read,
/// searched and filtered as before, and fail every attribute and flag filter.
#[test]
fn milvus_rows_without_product_keys_fail_attribute_filters_only() {
    use milvus::v2::prelude::{ClientV2, ConnectConfig, InsertRequest};
    let milvus = MilvusLite::start();
    let address = milvus.address("old_rows").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    let mut s = MilvusStore::open(&address, &info).unwrap();
    s.extend_schema(&schema()).unwrap();
    let mut g = Gen(11);

    // An old row, written as the store wrote rows before products: the fixed fields only.
    let mut old = record(1, &mut g);
    old.id = s.allocate_id(&old.content_hash).unwrap();
    let mut stored = serde_json::to_value(&old).unwrap();
    stored.as_object_mut().unwrap().remove("itc");
    let row = serde_json::json!({
        "id": old.id.0 as i64,
        "path": old.path,
        "hash": old.content_hash,
        "width": old.width as i64,
        "height": old.height as i64,
        "day": serde_json::Value::Null,
        "record": stored.to_string(),
        "text": "a dog and a cat everyone",
        "vector": old.itc,
    });
    let port = milvus.port;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(async move {
            let config = ConnectConfig::new().uri(format!("http://127.0.0.1:{port}"));
            let client = ClientV2::new(&config).await?;
            let insert = InsertRequest::builder()
                .collection_name("old_rows")
                .rows(vec![row])
                .build()?;
            client.insert(insert).await.map(|_| ())
        })
        .unwrap();

    let mut new = record(2, &mut g);
    new.product = Some(catalogue()[0].0.clone());
    let pdq = Pdq {
        hash: PdqHash([0xa5; 32]),
        quality: 100,
    };
    new.pdq = Some(pdq);
    new.flags = vec![flag("bank", 1, None)];
    let new_id = add(&mut s, new).unwrap();
    assert_eq!(s.get(old.id).unwrap().as_ref(), Some(&old));
    // Nor moderation keys: the old row has no hash and passes no flag filter.
    assert_eq!(s.pdq_hashes().unwrap(), [(new_id, pdq)]);
    for f in flag_filters() {
        let want: Vec<ImageId> = records(&s)
            .iter()
            .filter(|r| f.accepts(r))
            .map(|r| r.id)
            .collect();
        assert_eq!(s.matching(&f, 10).unwrap(), want, "{f:?}");
    }
    let mut both = vec![old.id, new_id];
    both.sort();
    assert_eq!(s.matching(&Filter::default(), 10).unwrap(), both);
    let everything = ids(&s.text_search("everyone", 10, &Filter::default()).unwrap());
    assert_eq!(everything, [old.id.0, new_id.0].into());
    assert_eq!(
        s.products_of(&[old.id, new_id]).unwrap(),
        [None, Some(catalogue()[0].0.clone())]
    );
    assert_eq!(
        s.product_images(None).unwrap(),
        [("RUN".to_string(), vec![new_id])].into()
    );
    for f in attribute_filters() {
        let got = ids(&s.vector_search(&g.unit(), 10, None, &f).unwrap());
        assert!(!got.contains(&old.id.0), "{f:?}");
        let want: BTreeSet<u64> = records(&s)
            .iter()
            .filter(|r| f.accepts(r))
            .map(|r| r.id.0)
            .collect();
        assert_eq!(got, want, "{f:?}");
    }
    let wide = Filter {
        min_width: Some(1),
        ..Filter::default()
    };
    assert_eq!(
        ids(&s.vector_search(&g.unit(), 10, None, &wide).unwrap()),
        everything
    );
}

/// Vectors of BLIP's size in the test of selective filters (graph searches miss more there).
const BLIP_DIM: usize = 256;

/// A filter that 1% of 4000 images pass, asked for more than pass: every passing image comes
/// back, on a store whose graph search alone may come back short.
fn selective_filters_return_k_whenever_k_pass(s: &mut dyn Store) {
    let mut g = Gen(0x5eed_1234_abcd);
    let unit = |g: &mut Gen| {
        let v: Vec<f32> = (0..BLIP_DIM)
            .map(|_| (g.next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    s.extend_schema(&schema()).unwrap();
    let mut batch = Vec::new();
    let mut rare = Vec::new();
    for n in 0..4000u64 {
        let mut r = record(10_000 + n, &mut g);
        r.itc = unit(&mut g);
        r.id = s.allocate_id(&r.content_hash).unwrap();
        let brand = if n % 100 == 7 { "rare" } else { "common" };
        r.product = Some(product(&format!("P{n}"), "", "", &[("brand", text(brand))]));
        r.pdq = Some(Pdq {
            hash: PdqHash([(n % 251) as u8; 32]),
            quality: (n % 101) as u8,
        });
        if brand == "rare" {
            rare.push((r.id, r.itc.clone()));
        }
        batch.push(r);
        if batch.len() == 500 {
            s.insert_all(std::mem::take(&mut batch)).unwrap();
        }
    }
    s.commit().unwrap();
    let filter = Filter {
        attributes: vec![AttrFilter::parse("brand:rare", &schema()).unwrap()],
        ..Filter::default()
    };
    // Reads of many rows page through all of them, in id order, whatever order they were
    // written in (ids come from content hashes here, so in no order).
    let mut all: Vec<ImageId> = s.under("/lib/").unwrap().iter().map(|u| u.0).collect();
    assert_eq!(all.len(), 4000);
    all.sort();
    assert_eq!(s.matching(&Filter::default(), usize::MAX).unwrap(), all);
    assert_eq!(s.matching(&Filter::default(), 1500).unwrap(), all[..1500]);
    let mut rare_ids: Vec<ImageId> = rare.iter().map(|r| r.0).collect();
    rare_ids.sort();
    assert_eq!(s.matching(&filter, usize::MAX).unwrap(), rare_ids);
    let hashes = s.pdq_hashes().unwrap();
    assert_eq!(hashes.iter().map(|h| h.0).collect::<Vec<_>>(), all);
    for _ in 0..10 {
        let q = unit(&mut g);
        let got = s.vector_search(&q, 100, None, &filter).unwrap();
        let mut want: Vec<(u64, f32)> = rare
            .iter()
            .map(|(id, v)| (id.0, v.iter().zip(&q).map(|(a, b)| a * b).sum()))
            .collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let got_ids: Vec<u64> = got.iter().map(|h| h.0 .0).collect();
        let want_ids: Vec<u64> = want.iter().take(100).map(|h| h.0).collect();
        assert_eq!(got_ids.len(), 40, "40 images pass, so all 40 come back");
        assert_eq!(
            got_ids.iter().collect::<BTreeSet<_>>(),
            want_ids.iter().collect::<BTreeSet<_>>()
        );
    }
}

#[test]
fn embedded_selective_filters_return_k_whenever_k_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, BLIP_DIM, 5, 8);
    let mut s = Collection::open(tmp.path(), &info, HnswParams::default()).unwrap();
    selective_filters_return_k_whenever_k_pass(&mut s);
}

#[test]
fn milvus_selective_filters_return_k_whenever_k_pass() {
    let milvus = MilvusLite::start();
    let address = milvus.address("selective").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, BLIP_DIM, 5, 8);
    let mut s = MilvusStore::open(&address, &info).unwrap();
    selective_filters_return_k_whenever_k_pass(&mut s);
}

/// Whether the Milvus at `port` has each of `collections`.
fn milvus_has(port: u16, collections: &[&str]) -> Vec<bool> {
    use milvus::v2::prelude::{ClientV2, ConnectConfig, HasCollectionRequest};
    let names: Vec<String> = collections.iter().map(|c| c.to_string()).collect();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let config = ConnectConfig::new().uri(format!("http://127.0.0.1:{port}"));
            let client = ClientV2::new(&config).await?;
            let mut out = Vec::new();
            for name in names {
                let request = HasCollectionRequest::builder()
                    .collection_name(name)
                    .build()?;
                out.push(client.has_collection(request).await?.exists());
            }
            Ok::<_, milvus::v2::error::Error>(out)
        })
        .unwrap()
}

/// Drops one Milvus collection behind the store's back.
fn milvus_drop(port: u16, collection: &str) {
    use milvus::v2::prelude::{ClientV2, ConnectConfig, DropCollectionRequest};
    let name = collection.to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let config = ConnectConfig::new().uri(format!("http://127.0.0.1:{port}"));
            let client = ClientV2::new(&config).await?;
            let request = DropCollectionRequest::builder()
                .collection_name(name)
                .build()?;
            client.drop_collection(request).await
        })
        .unwrap();
}

/// Match lists and flags live in Milvus, not in a handle: two handles (as two processes would)
/// see each other's writes at once. A collection made before match lists gets its `__lists`
/// collection at its next open; replacing a collection (a reindex's swap) takes the new one's
/// lists, and dropping it drops them.
#[test]
fn milvus_lists_are_shared_and_go_with_their_collection() {
    let milvus = MilvusLite::start();
    let address: blipsearch::index::MilvusAddress = milvus.address("shared").parse().unwrap();
    let info = CollectionInfo::new("test/store-suite", None, DIM, 5, 8);
    let mut g = Gen(0x5A4E_D115_7500);
    let mut a = MilvusStore::open(&address, &info).unwrap();
    let mut b = MilvusStore::open(&address, &info).unwrap();

    a.create_list("bank").unwrap();
    assert!(matches!(
        b.create_list("bank"),
        Err(IndexError::ListExists(_))
    ));
    let e = entry("bank", 1, 8, Some(g.unit()));
    b.add_entries(std::slice::from_ref(&e)).unwrap();
    assert_eq!(a.entries(Some("bank")).unwrap(), std::slice::from_ref(&e));
    assert_eq!(a.lists().unwrap()[0].entries, 1);
    let mut r = record(1, &mut g);
    r.flags = vec![flag("bank", e.id, None)];
    let id = add(&mut a, r).unwrap();
    let pending = Filter {
        flagged: Some(FlagFilter {
            list: Some("bank".into()),
            pending_only: true,
        }),
        ..Filter::default()
    };
    assert_eq!(b.matching(&pending, 10).unwrap(), [id]);
    let mut seen = b.get(id).unwrap().unwrap();
    seen.flags[0].decision = Some(Decision {
        verdict: Verdict::Confirmed,
        note: String::new(),
        actor: "cli".into(),
        unix: 0,
    });
    b.update(&seen).unwrap();
    assert!(a.matching(&pending, 10).unwrap().is_empty());

    // Deleted by one, gone for the other; a list made again under the name is empty.
    b.delete_list("bank").unwrap();
    assert!(a.lists().unwrap().is_empty());
    assert!(matches!(
        a.add_entries(std::slice::from_ref(&e)),
        Err(IndexError::NoList(_))
    ));
    a.create_list("bank").unwrap();
    assert!(b.entries(Some("bank")).unwrap().is_empty());
    drop((a, b));

    // A collection made before match lists has no `__lists`: opening it makes one.
    milvus_drop(milvus.port, "shared__lists");
    assert_eq!(milvus_has(milvus.port, &["shared__lists"]), [false]);
    let mut s = MilvusStore::open_existing(&address).unwrap();
    assert!(s.lists().unwrap().is_empty());
    s.create_list("kept").unwrap();
    assert_eq!(s.get(id).unwrap().unwrap().flags, seen.flags);

    // Replaced by a collection with lists of its own: those are the lists now.
    let staging: blipsearch::index::MilvusAddress =
        milvus.address("shared_reindex").parse().unwrap();
    let mut fresh = MilvusStore::open(&staging, &info).unwrap();
    fresh.create_list("fresh").unwrap();
    let f = entry("fresh", 2, 1, None);
    fresh.add_entries(std::slice::from_ref(&f)).unwrap();
    drop(fresh);
    MilvusStore::replace(&address, &staging).unwrap();
    let lists: Vec<String> = s.lists().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(lists, ["fresh"]);
    assert_eq!(s.entries(None).unwrap(), [f]);
    drop(s);

    MilvusStore::drop_collection(&address).unwrap();
    assert_eq!(
        milvus_has(
            milvus.port,
            &[
                "shared",
                "shared__excluded",
                "shared__lists",
                "shared_reindex__lists"
            ]
        ),
        [false; 4]
    );
}
