//! `overlay-ctl run`, `attach`, `detach` and `endpoint list`: containers on networks.
//! The lifecycle behind them is [`crate::runtimes::run`] and
//! [`crate::runtimes::session`]; this only gathers the arguments and prints.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;

use super::{
    args::{Global, NetnsTarget, OptionalNetnsTarget},
    output::{print_table, warn_rejected},
};
use crate::{
    agent::dns::{self, ContainerDns},
    agent::local_state::LocalState,
    dataplane::netns::NETNS_RUN_DIR,
    runtimes::{
        command::{self, RunSignals},
        container::{self, Context, JoinSpec},
        run::{self, ContainerRun, RunRequest},
        session,
    },
    store::{records::RecordKind, Network},
};

/// The arguments of `run`.
pub struct RunArgs<'a> {
    pub network: &'a str,
    pub name: Option<&'a str>,
    pub ip: Option<Ipv4Addr>,
    pub service: Option<&'a str>,
    pub command: &'a [String],
}

/// What container commands work with: the local agent, the store it uses, this node's
/// records.
async fn context(cli: &Global) -> anyhow::Result<Context> {
    let (agent, status) = super::require_agent(&cli.state_dir).await?;
    Ok(Context {
        store: super::store_for(cli, Some(&status)).await?,
        agent,
        status,
        local: LocalState::new(&cli.state_dir),
    })
}

/// `run`: starts the container, runs its command, removes it; exits with the command's
/// code.
pub async fn run(cli: &Global, args: RunArgs<'_>) -> anyhow::Result<ExitCode> {
    // Before anything changes, so that a SIGTERM during set-up still cleans up.
    let mut signals = RunSignals::install()?;
    let id = run::container_id(args.name)?;
    let ctx = context(cli).await?;
    if args.service.is_some() {
        run::check_service_store(&ctx.store)?;
    }
    let request = RunRequest {
        network: args.network,
        id: &id,
        ip: args.ip,
        command: args.command,
    };
    let mut container = ContainerRun::start(&ctx, &request).await?;
    let joined = container.joined();
    eprintln!(
        "overlay: container {} on {} has address {} (node {})",
        id, args.network, joined.endpoint.ip, ctx.status.node
    );
    if let Some(service) = args.service {
        container = container.register_service(service).await?;
    }
    let status = container.wait(&mut signals).await;
    let removed = container.teardown().await;
    let status = status?;
    removed?;
    Ok(ExitCode::from(command::exit_code(status)))
}

/// `attach`: joins an existing namespace to a network until `detach`.
pub async fn attach(
    cli: &Global,
    network: &str,
    target: &NetnsTarget,
    name: Option<&str>,
    ip: Option<Ipv4Addr>,
    ifname: &str,
) -> anyhow::Result<()> {
    let path = container::netns_path(target.netns.clone(), target.pid)
        .context("--netns or --pid is required")?;
    let id = match name {
        Some(n) => n.to_string(),
        None => derived_id(target.netns.as_deref(), target.pid),
    };
    let ctx = context(cli).await?;
    let spec = JoinSpec {
        network,
        id: &id,
        ip,
        container_ifname: ifname,
        container: Some(path.display().to_string()),
        keep_existing_default_route: true,
        netns_name: None,
    };
    let joined = session::attach(&ctx, path.clone(), &spec).await?;
    if ctx.status.dns {
        give_named_netns_resolver(&path, &joined.network);
    }
    println!(
        "{} {} {}/{}",
        joined.endpoint.id,
        joined.endpoint.ip,
        joined.network.name,
        joined.network.subnet.prefix()
    );
    Ok(())
}

/// The `ip netns` name of a namespace given as `/run/netns/NAME`.
fn named_netns(path: &Path) -> Option<&str> {
    if path.parent()? != Path::new(NETNS_RUN_DIR) {
        return None;
    }
    path.file_name()?.to_str()
}

/// A named namespace gets the network's resolver the `ip netns` way
/// (`/etc/netns/NAME/resolv.conf`, which `ip netns exec NAME` binds over
/// /etc/resolv.conf); other namespaces' resolvers are their runtime's business.
fn give_named_netns_resolver(path: &Path, network: &Network) {
    let Some(name) = named_netns(path) else {
        return;
    };
    let settings = ContainerDns::new(network.gateway, &network.name);
    match dns::write_netns_resolv_conf(name, &settings) {
        Ok(file) => eprintln!(
            "overlay: {} names {} as the resolver (search {})",
            file.display(),
            network.gateway,
            network.name
        ),
        Err(e) => eprintln!("overlay: warning: {e}"),
    }
}

/// Removes what [`give_named_netns_resolver`] wrote for `network` (a resolv.conf written
/// by a later attach to another network is that network's).
fn remove_named_netns_resolver(container: Option<&str>, network: &str) {
    let Some(name) = container.map(Path::new).and_then(named_netns) else {
        return;
    };
    let file = Path::new(dns::container::NETNS_ETC_DIR)
        .join(name)
        .join("resolv.conf");
    let ours = std::fs::read_to_string(&file)
        .is_ok_and(|text| text.lines().any(|l| l == format!("search {network}")));
    if ours {
        if let Err(e) = dns::remove_netns_resolv_conf(name) {
            eprintln!("overlay: warning: {e}");
        }
    }
}

/// The endpoint name of an attachment started without `--name`.
fn derived_id(netns: Option<&Path>, pid: Option<u32>) -> String {
    match (netns, pid) {
        (Some(path), _) => path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .filter(|n| crate::store::ipam::validate_name(n).is_ok())
            .unwrap_or_else(container::random_id),
        (None, Some(pid)) => format!("pid{pid}"),
        (None, None) => container::random_id(),
    }
}

/// `detach`: removes an attached endpoint, named or found by its namespace.
pub async fn detach(
    cli: &Global,
    network: &str,
    name: Option<&str>,
    target: &OptionalNetnsTarget,
) -> anyhow::Result<()> {
    let ctx = context(cli).await?;
    let netns: Option<PathBuf> = container::netns_path(target.netns.clone(), target.pid);
    let endpoint = session::find_attached(&ctx, network, name, netns).await?;
    session::remove(&ctx, &endpoint, true).await?;
    remove_named_netns_resolver(endpoint.container.as_deref(), network);
    println!("{} detached", endpoint.id);
    Ok(())
}

/// `endpoint list`: the cluster's endpoints, or one network's.
pub async fn list_endpoints(cli: &Global, network: Option<&str>, json: bool) -> anyhow::Result<()> {
    let agent = super::try_agent(&cli.state_dir).await;
    let store = super::store_for(cli, agent.as_ref()).await?;
    if let Some(n) = network {
        crate::store::ipam::validate_name(n)?;
    }
    let snapshot = store.snapshot().await?;
    let in_scope = |net: &str| network.is_none_or(|n| n == net);
    warn_rejected(&store, &snapshot, |kind, rest| {
        kind == RecordKind::Endpoint && in_scope(rest.split('/').nth(1).unwrap_or(""))
    });
    let endpoints: Vec<_> = snapshot
        .state
        .endpoints
        .into_iter()
        .filter(|e| in_scope(&e.network))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&endpoints)?);
        return Ok(());
    }
    let rows = endpoints
        .iter()
        .map(|e| {
            vec![
                e.network.clone(),
                e.id.clone(),
                e.ip.to_string(),
                e.mac.to_string(),
                e.node.clone(),
                e.container.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["NETWORK", "NAME", "IP", "MAC", "NODE", "CONTAINER"], rows);
    Ok(())
}
