//! A PostgreSQL server of the test's own with `ssl = on`: `initdb` in a temporary directory,
//! a test CA and a server certificate for `localhost` (no IP address in it), started on a free
//! port with `pg_hba.conf` allowing TCP only over TLS (`hostssl`). The admin connection uses
//! the server's Unix socket. Stopped (`pg_ctl stop -m immediate`) when the value goes.
//!
//! PostgreSQL refuses to run as root: when the tests do, the server runs as `postgres`
//! (`runuser`), and the directory is handed to that user.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A running TLS-only PostgreSQL.
pub struct TlsServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// The CA that signed the server certificate (for `sslrootcert`).
    pub ca_file: PathBuf,
}

/// Where PostgreSQL's server programs are (`pg_config --bindir`, else the newest Debian one).
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").exists());
    found.sort();
    found
        .pop()
        .expect("no PostgreSQL server programs (initdb): `apt-get install postgresql`")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs `program` with `args` as the server's user; panics with its output on failure.
fn run_as_server(program: &Path, args: &[&str]) {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).output().expect("run a PostgreSQL program");
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TlsServer {
    /// initdb, certificates, start; returns once the server accepts connections.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(chown.success(), "chown the PostgreSQL directory");
        }
        let data_s = data.to_str().unwrap();
        run_as_server(
            &bin.join("initdb"),
            &["-D", data_s, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        );

        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(DnType::CommonName, "lobby test PostgreSQL CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = server.signed_by(&key, &issuer).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let (crt, key_file) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&crt, server_cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        if is_root() {
            for f in [&crt, &key_file, &data.join("pg_hba.conf"), &ca_file] {
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(f)
                    .status()
                    .unwrap();
            }
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();

        let port = free_port();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c ssl=on -c unix_socket_directories={} \
             -c fsync=off -c max_connections=60",
            dir.path().display()
        );
        let log = dir.path().join("server.log");
        run_as_server(
            &bin.join("pg_ctl"),
            &[
                "-D",
                data_s,
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        Self {
            dir,
            bin,
            port,
            ca_file,
        }
    }

    /// A lobby `store.url` for `db` on this server: TCP to `host`, with `query` (the TLS
    /// settings under test).
    pub fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/{db}?{query}", self.port)
    }

    /// `verify-full` against the test CA, by the name in the certificate.
    pub fn verified_url(&self, db: &str) -> String {
        self.url(
            "localhost",
            db,
            &format!("sslmode=verify-full&sslrootcert={}", self.ca_file.display()),
        )
    }

    /// An admin client over the Unix socket (no TLS needed there).
    pub async fn admin(&self) -> tokio_postgres::Client {
        self.client("postgres").await
    }

    /// A client of database `db` over the Unix socket.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.dir.path())
            .port(self.port)
            .user("postgres")
            .dbname(db);
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates database `name`.
    pub async fn create_db(&self, name: &str) {
        self.admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}
