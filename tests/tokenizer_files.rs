//! The two tokenizer files a checkpoint may carry: hub checkpoints saved by older transformers
//! versions have only `vocab.txt`, newer ones `tokenizer.json`. A model folder with either one
//! loads, both give every text the same token ids, and both decode word pieces the same.

mod common;

use std::path::{Path, PathBuf};

use blipsearch::model::caption::Captioner;
use blipsearch::model::tokenizer::{BlipTokenizer, MAX_TEXT_TOKENS};
use blipsearch::model::{ModelSource, Retriever};
use candle_core::Device;
use common::{copy_dir, fixtures};

/// Texts that exercise the BERT pipeline: case, accents, punctuation, digits, Chinese
/// characters (split one by one), long words cut into pieces, unknown symbols, and a text
/// longer than BLIP's limit.
const TEXTS: [&str; 8] = [
    "A ROCKET launching into the sky!!!",
    "Café crème, naïve façade; résumé (2024)",
    "a cup of coffee on a wooden table",
    "unbelievably antidisestablishmentarianism",
    "北京 and 東京 at night",
    "emoji 🚀 and symbols ∑ ≠ ☃",
    "3.14159 apples, 42 oranges & 7 pears",
    "a very long description of a photograph that goes on and on about the many colours \
     shapes and objects it shows until it is far past the thirty five tokens BLIP keeps",
];

/// A copy of the checkpoint folder `from` without the tokenizer file `without`.
fn copy_without(from: &Path, to: &Path, without: &str) {
    copy_dir(from, to);
    std::fs::remove_file(to.join(without)).unwrap();
}

/// [UNK]: what a character outside the vocabulary becomes.
const UNK: u32 = 100;

fn assert_same(what: &str, json: &BlipTokenizer, vocab: &BlipTokenizer) {
    for text in TEXTS {
        let a = json.encode_batch(&[text], MAX_TEXT_TOKENS).unwrap();
        let b = vocab.encode_batch(&[text], MAX_TEXT_TOKENS).unwrap();
        assert_eq!(a.ids, b.ids, "{what}: {text:?}");
        assert_eq!(a.truncated, b.truncated, "{what}: {text:?}");
        let pieces = json.pieces(text).unwrap();
        assert_eq!(pieces, vocab.pieces(text).unwrap(), "{what}: {text:?}");
        assert_eq!(
            json.decode(&pieces).unwrap(),
            vocab.decode(&pieces).unwrap(),
            "{what}: {text:?}"
        );
        assert_eq!(
            json.decode(&a.ids[0]).unwrap(),
            vocab.decode(&b.ids[0]).unwrap(),
            "{what}: {text:?}"
        );
    }
    // BERT's own special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) decode to nothing in both.
    let specials = [0, UNK, 101, 102, 103];
    assert_eq!(json.decode(&specials).unwrap(), "", "{what}");
    assert_eq!(vocab.decode(&specials).unwrap(), "", "{what}");
    // The long text is cut, the others are not: the comparison covered both paths.
    let cut = json
        .encode_batch(&TEXTS, MAX_TEXT_TOKENS)
        .unwrap()
        .truncated;
    assert_eq!(cut.iter().filter(|&&c| c).count(), 1, "{cut:?}");
}

/// Copies of `tiny-a/<name>` in `tmp`: (only tokenizer.json, only vocab.txt).
fn both_folders(tmp: &Path, name: &str) -> (PathBuf, PathBuf) {
    let from = fixtures().join("tiny-a").join(name);
    let (json_only, vocab_only) = (tmp.join("json"), tmp.join("vocab"));
    copy_without(&from, &json_only, "vocab.txt");
    copy_without(&from, &vocab_only, "tokenizer.json");
    (json_only, vocab_only)
}

#[test]
fn a_retrieval_checkpoint_with_only_vocab_txt_tokenises_as_with_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |dir: PathBuf| Retriever::load(&ModelSource::Dir(dir), &Device::Cpu).unwrap();
    let (json, vocab) = both_folders(tmp.path(), "retrieval");
    assert_same("retrieval", load(json).tokenizer(), load(vocab).tokenizer());
}

#[test]
fn a_caption_checkpoint_with_only_vocab_txt_tokenises_as_with_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let load = |dir: PathBuf| Captioner::load(&ModelSource::Dir(dir), &Device::Cpu).unwrap();
    let (json, vocab) = both_folders(tmp.path(), "caption");
    assert_same("caption", load(json).tokenizer(), load(vocab).tokenizer());
}
