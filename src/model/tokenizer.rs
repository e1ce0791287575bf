//! BERT WordPiece tokenisation as BLIP uses it: the checkpoint's `tokenizer.json` (or `vocab.txt`),
//! plus BLIP's two extra tokens [DEC]=30522 and [ENC]=30523 (absent from the HF tokenizer files),
//! and BLIP's `pre_caption` text cleaning.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

use super::error::{ModelError, Result};

/// [PAD].
pub const PAD: u32 = 0;
/// [CLS]: first token of texts for the encoders.
pub const CLS: u32 = 101;
/// [SEP]: ends every text; captions stop here.
pub const SEP: u32 = 102;
/// [DEC]: the decoder's start token.
pub const DEC: u32 = 30522;
/// [ENC]: first token of the image-grounded text encoder (ITM), as BLIP was trained.
pub const ENC: u32 = 30523;
/// BLIP's maximum text length for retrieval, in tokens including [CLS] and [SEP].
pub const MAX_TEXT_TOKENS: usize = 35;

/// BLIP's `pre_caption`: lowercase, `.!"()*#:;~` become spaces, runs of whitespace collapse,
/// leading and trailing spaces go.
pub fn pre_caption(text: &str) -> String {
    let lowered = text.to_lowercase();
    let replaced: String = lowered
        .chars()
        .map(|c| if ".!\"()*#:;~".contains(c) { ' ' } else { c })
        .collect();
    // Python's `\s{2,}` -> ' ' leaves single whitespace characters (a lone tab) as they are.
    let mut out = String::with_capacity(replaced.len());
    let chars: Vec<char> = replaced.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            let start = i;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if i - start >= 2 {
                out.push(' ');
            } else {
                out.push(chars[start]);
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out.trim_end_matches('\n').trim_matches(' ').to_string()
}

/// A padded batch of token ids.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// Token ids per text, unpadded, [CLS] ... [SEP].
    pub ids: Vec<Vec<u32>>,
    /// Whether each text was cut to the length limit.
    pub truncated: Vec<bool>,
}

impl TextBatch {
    /// Longest sequence.
    pub fn max_len(&self) -> usize {
        self.ids.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// `(ids, mask)` tensors `(N, max_len)` u32, padded with [PAD]; `first` replaces token 0
    /// (e.g. [ENC] for ITM) when given.
    pub fn tensors(&self, first: Option<u32>, device: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.ids.len();
        let l = self.max_len();
        let mut ids = vec![PAD; n * l];
        let mut mask = vec![0u32; n * l];
        for (row, seq) in self.ids.iter().enumerate() {
            for (j, &t) in seq.iter().enumerate() {
                ids[row * l + j] = t;
                mask[row * l + j] = 1;
            }
            if let Some(f) = first {
                ids[row * l] = f;
            }
        }
        Ok((
            Tensor::from_vec(ids, (n, l), device)?,
            Tensor::from_vec(mask, (n, l), device)?,
        ))
    }
}

/// The tokenizer of a BLIP checkpoint.
pub struct BlipTokenizer {
    inner: Tokenizer,
}

impl BlipTokenizer {
    /// Loads `tokenizer.json`, or builds bert-base-uncased's pipeline from `vocab.txt`.
    pub fn from_files(tokenizer_json: Option<&Path>, vocab_txt: Option<&Path>) -> Result<Self> {
        let err = |p: &Path, e: String| ModelError::Tokenizer(format!("{}: {e}", p.display()));
        let mut inner = match (tokenizer_json, vocab_txt) {
            (Some(p), _) => Tokenizer::from_file(p).map_err(|e| err(p, e.to_string()))?,
            (None, Some(p)) => {
                let file = p
                    .to_str()
                    .ok_or_else(|| err(p, "path is not UTF-8".into()))?;
                let wp = WordPiece::from_file(file)
                    .unk_token("[UNK]".into())
                    .build()
                    .map_err(|e| err(p, e.to_string()))?;
                let mut t = Tokenizer::new(wp);
                t.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
                t.with_pre_tokenizer(Some(BertPreTokenizer));
                t.with_decoder(Some(WordPieceDecoder::default()));
                // As bert-base-uncased's tokenizer.json has them: special, so never decoded.
                t.add_special_tokens(
                    &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                        .map(|name| AddedToken::from(name, true)),
                );
                t
            }
            (None, None) => {
                return Err(ModelError::Tokenizer(
                    "no tokenizer.json or vocab.txt in the checkpoint".into(),
                ))
            }
        };
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        inner.add_special_tokens(&[
            AddedToken::from("[DEC]", true),
            AddedToken::from("[ENC]", true),
        ]);
        for (name, want) in [
            ("[PAD]", PAD),
            ("[CLS]", CLS),
            ("[SEP]", SEP),
            ("[DEC]", DEC),
            ("[ENC]", ENC),
        ] {
            let got = inner.token_to_id(name);
            if got != Some(want) {
                return Err(ModelError::Tokenizer(format!(
                    "{name} has id {got:?}, BLIP needs {want}: is this bert-base-uncased's vocabulary?"
                )));
            }
        }
        Ok(Self { inner })
    }

    /// Word pieces of `text` without special tokens.
    pub fn pieces(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Cleans (`pre_caption`) and tokenises texts as `[CLS] pieces [SEP]`, cut to `max_len`
    /// tokens. An empty text (after cleaning) is an error.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> Result<TextBatch> {
        if max_len < 3 {
            return Err(ModelError::InvalidInput(format!("max_len {max_len} < 3")));
        }
        let mut ids = Vec::with_capacity(texts.len());
        let mut truncated = Vec::with_capacity(texts.len());
        for text in texts {
            let clean = pre_caption(text);
            let mut pieces = self.pieces(&clean)?;
            if pieces.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "text {text:?} is empty after cleaning"
                )));
            }
            let cut = pieces.len() > max_len - 2;
            pieces.truncate(max_len - 2);
            let mut seq = Vec::with_capacity(pieces.len() + 2);
            seq.push(CLS);
            seq.extend(pieces);
            seq.push(SEP);
            ids.push(seq);
            truncated.push(cut);
        }
        Ok(TextBatch { ids, truncated })
    }

    /// Turns ids back into text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_caption_matches_blip() {
        assert_eq!(
            pre_caption("A ROCKET launching into the sky!!!"),
            "a rocket launching into the sky"
        );
        assert_eq!(
            pre_caption("coffee cup (on a table)...  with   spaces"),
            "coffee cup on a table with spaces"
        );
        assert_eq!(pre_caption("  x~y  "), "x y");
        assert_eq!(pre_caption("a\tb"), "a\tb");
    }
}
