//! Products on an ingested collection, for tests of filters, facets and grouping: the products
//! are written through the index's public API (`Store::extend_schema`, `Store::update` with
//! `product` set, then a commit) on a closed embedded collection, as a catalogue import would
//! leave them.

use std::collections::BTreeMap;
use std::path::Path;

use blipsearch::index::{
    merge_schema, AttrValue, Collection, HnswParams, ImageRecord, Product, Schema, Store,
};

/// A product of a test catalogue and the file names of its images.
pub struct CatalogueEntry {
    /// The product as every one of its images carries it.
    pub product: Product,
    /// File names of its images in the ingested folder.
    pub images: Vec<&'static str>,
}

/// A product `id` titled `title` with `attributes`.
pub fn product(id: &str, title: &str, attributes: &[(&str, AttrValue)]) -> Product {
    Product {
        id: id.to_string(),
        title: Some(title.to_string()),
        description: None,
        attributes: attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

/// A keyword or date value.
pub fn text(s: &str) -> AttrValue {
    AttrValue::Text(s.to_string())
}

/// The schema `entries` imply: each attribute's type inferred from its values.
pub fn schema_of(entries: &[CatalogueEntry]) -> Schema {
    let mut schema = Schema::new();
    for e in entries {
        let mine: Schema = e
            .product
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.inferred_type()))
            .collect();
        merge_schema(&mut schema, &mine).expect("one type per attribute");
    }
    schema
}

/// [`assign_products_in`] the embedded collection in `index` (closed: no server has it open).
pub fn assign_products(
    index: &Path,
    entries: &[CatalogueEntry],
) -> BTreeMap<String, Vec<blipsearch::index::ImageId>> {
    let mut store = Collection::open_existing(index, HnswParams::default()).unwrap();
    assign_products_in(&mut store, entries)
}

/// Gives the images of `store` their products, records the attribute types, and commits.
/// Every named image must be in the collection, once. Returns the ids of each product's
/// images, by product id.
pub fn assign_products_in(
    store: &mut dyn Store,
    entries: &[CatalogueEntry],
) -> BTreeMap<String, Vec<blipsearch::index::ImageId>> {
    let mut by_name: BTreeMap<String, ImageRecord> = BTreeMap::new();
    store
        .for_each(&mut |r| {
            let name = Path::new(&r.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(by_name.insert(name, r).is_none(), "two images of one name");
            Ok(())
        })
        .unwrap();
    store.extend_schema(&schema_of(entries)).unwrap();
    let mut ids = BTreeMap::new();
    for e in entries {
        for name in &e.images {
            let mut record = by_name
                .remove(*name)
                .unwrap_or_else(|| panic!("{name} is not in the collection (or named twice)"));
            record.product = Some(e.product.clone());
            store.update(&record).unwrap();
            ids.entry(e.product.id.clone())
                .or_insert_with(Vec::new)
                .push(record.id);
        }
    }
    store.commit().unwrap();
    ids
}
