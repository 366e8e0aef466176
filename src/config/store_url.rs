//! `store.url`: which store backend, and where (SPEC §8; the backends are in `crate::store`).

/// The `store.url` forms, for messages.
pub const SUPPORTED_URLS: &str =
    "sqlite://<path>, sqlite::memory:, postgres://user@host/db or postgresql://user@host/db";

/// A parsed `store.url`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://<path>`
    SqliteFile(std::path::PathBuf),
    /// `sqlite::memory:` (tests)
    SqliteMemory,
    /// `postgres://…` or `postgresql://…`: the whole URL, as libpq reads it (it may carry a
    /// password, so `Debug` hides it).
    Postgres(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SqliteFile(p) => f.debug_tuple("SqliteFile").field(p).finish(),
            Self::SqliteMemory => f.write_str("SqliteMemory"),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(&redacted(url)).finish(),
        }
    }
}

impl StoreUrl {
    /// Parses the config value; `None` for an unsupported scheme. A PostgreSQL URL's options
    /// are checked when it is opened.
    pub fn parse(url: &str) -> Option<Self> {
        if url == "sqlite::memory:" {
            return Some(Self::SqliteMemory);
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Some(Self::Postgres(url.to_owned()));
        }
        let path = url.strip_prefix("sqlite://")?;
        (!path.is_empty()).then(|| Self::SqliteFile(path.into()))
    }
}

/// `url` with the password of its `user:password@` part replaced, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_by_scheme() {
        assert_eq!(
            StoreUrl::parse("sqlite::memory:"),
            Some(StoreUrl::SqliteMemory)
        );
        assert_eq!(
            StoreUrl::parse("sqlite://data/lobby.db"),
            Some(StoreUrl::SqliteFile("data/lobby.db".into()))
        );
        for url in [
            "postgres://u@h/db",
            "postgresql://u@h:5433/db?sslmode=disable",
        ] {
            assert_eq!(StoreUrl::parse(url), Some(StoreUrl::Postgres(url.into())));
        }
        for url in ["sqlite://", "mysql://u@h/db", "postgres:/h/db", ""] {
            assert_eq!(StoreUrl::parse(url), None, "{url}");
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        let url = "postgres://lobby:s3cret@db.example:5432/lobby?sslmode=disable";
        assert_eq!(
            redacted(url),
            "postgres://lobby:***@db.example:5432/lobby?sslmode=disable"
        );
        assert!(!format!("{:?}", StoreUrl::parse(url).unwrap()).contains("s3cret"));
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }
}
