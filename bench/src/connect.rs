//! `--only connect`: how fast the built-in broker lets clients in, by how
//! they log in: plain and anonymous, plain with a password (a `$7$` hash
//! as `mosquitto_passwd` writes it), TLS (the broker's certificate only),
//! and TLS with a client certificate whose common name is the user name.
//! Ten clients at a time connect, wait for the CONNACK and DISCONNECT, with
//! a new client id each time, until `total` have; the figure is connects
//! per second, with the daemon's CPU time per connect beside it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, Event};
use testkit::{ConfigFile, Local, Mosquitto, Pki, free_port, port_open, write_config};

use crate::{Dial, Usage, edgefn_config, start_edgefn};

/// Clients connecting at once.
const AT_ONCE: usize = 10;

/// Gives `file`'s built-in broker a TLS listener on `port` with `pki`'s
/// broker certificate; `client_certs`: clients must show one of `pki`'s,
/// whose common name is their user name.
pub(crate) fn tls_listener(file: &mut ConfigFile, pki: &Pki, port: u16, client_certs: bool) {
    let local = &mut file.local;
    let path = |name: &str| Some(pki.file(name).display().to_string());
    local.tls_listen = Some(format!("127.0.0.1:{port}"));
    local.cert_file = path("broker.pem");
    local.key_file = path("broker.key");
    if client_certs {
        local.ca_file = path("ca.pem");
        local.require_certificate = Some(true);
        local.use_identity_as_username = Some(true);
    }
}

/// TLS to a broker with `pki`'s certificate; `client_cert`: showing `pki`'s
/// client certificate.
pub(crate) fn tls_dial(pki: &Pki, client_cert: bool) -> Dial {
    let files = edgefn::tls::TlsFiles {
        ca_file: Some(pki.file("ca.pem")),
        cert_file: client_cert.then(|| pki.file("client.pem")),
        key_file: client_cert.then(|| pki.file("client.key")),
    };
    let tls = files.load().map_err(|p| anyhow::anyhow!("{p:?}")).unwrap();
    Dial {
        tls: Some(tls.config),
        login: None,
    }
}

/// Connects, waits for a successful CONNACK, DISCONNECTs.
async fn connect_once(dial: &Dial, id: String, port: u16) -> anyhow::Result<()> {
    let (client, mut events) = AsyncClient::new(dial.options(id, port), 10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await? {
            Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Success => {
                break;
            }
            Ok(Event::Incoming(Packet::ConnAck(a))) => anyhow::bail!("refused: {:?}", a.code),
            Ok(_) => {}
            Err(e) => anyhow::bail!("{e}"),
        }
    }
    client.disconnect().await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.poll()).await? {
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
    }
}

/// `total` connects through `dial` to `port`: (connects/s, daemon CPU µs per connect).
async fn measure(dial: &Dial, port: u16, pid: u32, total: usize) -> anyhow::Result<(f64, f64)> {
    let before = Usage::of(pid).context("daemon gone")?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..AT_ONCE {
        let dial = dial.clone();
        tasks.push(tokio::spawn(async move {
            for i in (t..total).step_by(AT_ONCE) {
                connect_once(&dial, format!("bench-connect-{i}"), port).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu_us, _) = Usage::of(pid).context("daemon gone")?.since(&before);
    Ok((total as f64 / elapsed, cpu_us / total as f64))
}

/// Runs the four rows and prints them.
pub(crate) async fn run(module: &Path, total: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new();
    let cloud = Mosquitto::cloud().await;
    let passwd = dir.path().join("passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b", passwd.to_str().unwrap(), "bench", "s3cret"])
        .status()
        .context("mosquitto_passwd (apt-get install mosquitto)")?;
    anyhow::ensure!(made.success(), "mosquitto_passwd failed");

    println!(
        "\n{total} connects per row, {AT_ONCE} at a time, each CONNECT, CONNACK, DISCONNECT\n"
    );
    println!("| how clients log in | connects/s | daemon CPU µs/connect |\n| --- | ---: | ---: |");
    for client_certs in [false, true] {
        let (port, tls_port) = (free_port(), free_port());
        let mut file = edgefn_config(
            dir.path(),
            Local::Embedded(port),
            cloud.port,
            module,
            "full",
        );
        file.local.password_file = Some(passwd.display().to_string());
        file.local.allow_anonymous = Some(true);
        tls_listener(&mut file, &pki, tls_port, client_certs);
        let daemon = start_edgefn(&write_config(dir.path(), &file))?;
        port_open(tls_port).await;
        let pid = daemon.0.id();
        let rows: Vec<(&str, Dial, u16)> = if client_certs {
            vec![(
                "TLS, client certificate (its name the user)",
                tls_dial(&pki, true),
                tls_port,
            )]
        } else {
            let password = Dial {
                tls: None,
                login: Some(("bench".into(), "s3cret".into())),
            };
            vec![
                ("plain, anonymous", Dial::default(), port),
                ("plain, password ($7$, 101 iterations)", password, port),
                (
                    "TLS, anonymous (the broker's certificate)",
                    tls_dial(&pki, false),
                    tls_port,
                ),
            ]
        };
        for (name, dial, port) in rows {
            eprintln!("connect: {name} ...");
            let (rate, cpu) = measure(&dial, port, pid, total).await?;
            println!("| {name} | {rate:.0} | {cpu:.0} |");
        }
        drop(daemon);
    }
    Ok(())
}
