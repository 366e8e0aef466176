//! A throw-away PostgreSQL database per test. [`TestDb::create`] makes `lobby_t_<random hex>`
//! through the admin URL (env `LOBBY_TEST_POSTGRES`, default [`DEFAULT_ADMIN_URL`]) and drops
//! it, best-effort and `WITH (FORCE)`, when the value goes. A server that cannot be reached
//! fails the test with a message saying so: PostgreSQL tests never pass by skipping.

#![allow(dead_code)]

use rand::RngCore;
use tokio_postgres::{Client, NoTls};

/// Where the tests find PostgreSQL unless `LOBBY_TEST_POSTGRES` says otherwise.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL: a role allowed to create and drop databases.
pub fn admin_url() -> String {
    std::env::var("LOBBY_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned())
}

/// A client on `url`, its connection driven by a task of the current runtime.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A client on the admin URL; panics, naming the URL, when the server is not there.
pub async fn admin() -> Client {
    let url = admin_url();
    match connect(&url).await {
        Ok(client) => client,
        Err(e) => panic!(
            "PostgreSQL not reachable at {url} ({e}: {}); start it or set LOBBY_TEST_POSTGRES",
            std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
        ),
    }
}

/// `url` with its database (the path) replaced by `db`; the query string is kept.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A database that exists for one test.
pub struct TestDb {
    /// `lobby_t_<16 hex>`
    pub name: String,
    /// The admin URL pointed at this database: what `store.url` gets.
    pub url: String,
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn create() -> Self {
        let mut suffix = [0u8; 8];
        rand::rng().fill_bytes(&mut suffix);
        let name = format!("lobby_t_{}", hex::encode(suffix));
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e:?}"));
        let url = with_database(&admin_url(), &name);
        Self { name, url }
    }

    /// A client on this database, for looking under the store.
    pub async fn client(&self) -> Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e:?}", self.name))
    }
}

impl Drop for TestDb {
    /// Drops the database from a thread with its own runtime: `Drop` cannot await, and the
    /// test's runtime may be a single thread that is busy running this very drop.
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = connect(&admin_url()).await {
                    let _ = client.batch_execute(&sql).await;
                }
            });
        });
        let _ = dropper.join();
    }
}
