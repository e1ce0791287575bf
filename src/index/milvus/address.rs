//! [`MilvusAddress`]: where a Milvus collection is, as `milvus://HOST:PORT/COLLECTION`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::index::error::{IndexError, Result};

/// Where a Milvus collection is: `milvus://HOST:PORT/COLLECTION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilvusAddress {
    /// Host name or address of Milvus' gRPC endpoint.
    pub host: String,
    /// Its port (Milvus' default is 19530).
    pub port: u16,
    /// The collection name: letters, digits and `_`, not starting with a digit.
    pub collection: String,
}

impl FromStr for MilvusAddress {
    type Err = IndexError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            IndexError::InvalidParams(format!(
                "{s:?} is not a Milvus store address ({why}); write milvus://HOST:PORT/COLLECTION"
            ))
        };
        let rest = s
            .strip_prefix("milvus://")
            .ok_or_else(|| bad("it must start with milvus://"))?;
        let (authority, collection) = rest
            .split_once('/')
            .ok_or_else(|| bad("no collection name"))?;
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            None => (authority, 19530),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let valid = !collection.is_empty()
            && collection.len() <= 200
            && collection
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !collection.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(bad(
                "a collection name is letters, digits and _, not starting with a digit",
            ));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            collection: collection.to_string(),
        })
    }
}

impl fmt::Display for MilvusAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "milvus://{}:{}/{}",
            self.host, self.port, self.collection
        )
    }
}

impl MilvusAddress {
    /// The address as a path, for errors that name where a collection is.
    pub(super) fn as_path(&self) -> PathBuf {
        Path::new(&self.to_string()).to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a: MilvusAddress = "milvus://127.0.0.1:19531/photos_2".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 19531));
        assert_eq!(a.collection, "photos_2");
        assert_eq!(a.to_string(), "milvus://127.0.0.1:19531/photos_2");
        let d: MilvusAddress = "milvus://db/photos".parse().unwrap();
        assert_eq!(d.port, 19530);
        for bad in [
            "http://h:1/c",
            "milvus://h:1",
            "milvus://h:x/c",
            "milvus://:1/c",
            "milvus://h:1/2c",
            "milvus://h:1/a-b",
            "milvus://h:1/",
        ] {
            assert!(bad.parse::<MilvusAddress>().is_err(), "{bad}");
        }
    }
}
