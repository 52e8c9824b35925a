//! Egress: containers reach the world outside the cluster through their node.
//!
//! The container program passes a packet whose destination lies outside every overlay
//! subnet to the host stack (see `overlay-ebpf/src/container.rs`); the host routes it
//! like any forwarded packet (`net.ipv4.ip_forward`, which the agent already turns on in
//! [`super::underlay::enable_forwarding`]). What is missing for the reply to come back is
//! a source NAT: the packet leaves with the container's overlay address, which the
//! underlay does not route. This module owns the netfilter state that adds it, per
//! network:
//! - `masquerade`: traffic from the network's subnet to a destination outside every
//!   overlay subnet is masqueraded to the address of the interface it leaves through
//!   (the node's outgoing address); conntrack maps the replies back to the container.
//! - `none`: the same traffic is **dropped and counted** (a silent drop, as if the world
//!   were not there; the container sees a timeout). [`EgressNat::drops`] reads the
//!   counter per network for `status` and the metrics. Like Docker's `--internal`
//!   networks, only forwarded traffic is blocked: the node's own addresses (the gateway,
//!   services on the node) stay reachable.
//!
//! Overlay-to-overlay traffic is never NATed: the programs switch or encapsulate it
//! before the host stack sees it, and the rules exclude every overlay subnet anyway, so
//! a packet that does reach the host for another overlay address keeps its source.
//! A destination outside the overlay is reached through a non-overlay interface (the
//! container veths only carry routes to container /32s), so no interface match is
//! needed. Reverse-path filtering needs nothing either: a container's packets come in
//! through the veth its /32 route points at, and replies come in through the interface
//! that routes towards the outside host.
//!
//! ## Why nftables through `nft`'s JSON API
//! The kernel offers NAT in netfilter; doing it in the data plane would mean writing a
//! connection tracker in eBPF, which is exactly what conntrack already is. Of the ways to
//! program nf_tables from Rust, `rustables` (netlink, native) is GPL-3.0 and cannot be
//! linked into this MIT/Apache agent; hand-building nf_tables netlink messages (batch
//! framing, expression TLVs for payload, cmp, lookup, counter, masq, verdicts, and
//! parsing them back for the counters) would be several hundred lines of encoding that
//! `nft` (libnftables) already gets right. So this module describes its table with the
//! typed schema of the `nftables` crate (MIT/Apache, maintained) and hands it to `nft -j
//! -f -`, which turns it into one nf_tables netlink transaction: a change is atomic, so
//! there is no moment in which egress traffic leaves un-NATed. The cost is the `nft`
//! binary (Debian package `nftables`) on the node and one subprocess per change, which
//! happens only when networks change, never per packet.
//!
//! ## What it owns
//! One table, `ip overlay_egress`, with a `postrouting` NAT chain, a `forward` filter
//! chain and the interval set `overlay_subnets` that every rule's destination must lie
//! outside (one set, so a cluster of 4,096 networks costs 4,096 set elements, not a copy
//! of them in every rule). Nothing outside that table is read for decisions or changed; [`EgressNat::remove`]
//! deletes it (on `--ephemeral` exit and when the last network goes). Every rule carries
//! a comment naming its network, subnet and a fingerprint of the overlay subnets it
//! excludes, so [`EgressNat::ensure`] can tell an up-to-date table from a stale one by
//! reading it back: the same desired state applied twice changes nothing (no
//! transaction, rule handles and counters untouched).
//!
//! A host firewall with a `drop` policy on its own forward chain (Docker's iptables
//! FORWARD policy, for one) still drops egress traffic: netfilter runs every base chain,
//! and an accept in ours does not override a drop in another. Such a host must allow the
//! overlay subnets itself; this module does not touch other tables.
use std::{borrow::Cow, collections::BTreeMap, ffi::OsString, fmt};

use ipnetwork::Ipv4Network;
use nftables::{
    expr::{Expression, NamedExpression, Payload, PayloadField, Prefix},
    helper::{self, NftablesError},
    schema::{
        Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue,
        Table,
    },
    stmt::{AnonymousCounter, Counter, Drop, Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};
use serde::{Deserialize, Serialize};
use tracing::info;

/// The table the agent owns (`nft list table ip overlay_egress`).
pub const TABLE: &str = "overlay_egress";
/// The NAT chain, at the `postrouting` hook.
pub const NAT_CHAIN: &str = "postrouting";
/// The filter chain for `none` networks, at the `forward` hook.
pub const FILTER_CHAIN: &str = "forward";
/// The set of every overlay subnet (traffic to them is never NATed or dropped here).
pub const SUBNET_SET: &str = "overlay_subnets";
/// Netfilter's `srcnat` priority: where masquerading belongs.
const SRCNAT_PRIORITY: i32 = 100;
/// Netfilter's `filter` priority.
const FILTER_PRIORITY: i32 = 0;
/// The family of the table: the overlay is IPv4 only.
const FAMILY: NfFamily = NfFamily::IP;

/// What a network's containers may do towards destinations outside the overlay.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Source-NAT to the node's outgoing address.
    #[default]
    Masquerade,
    /// No egress: outbound traffic to outside destinations is dropped and counted.
    None,
}

impl fmt::Display for EgressMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Masquerade => "masquerade",
            Self::None => "none",
        })
    }
}

/// One network's egress as the store describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRule {
    /// The network's name (validated by the store: no whitespace).
    pub network: String,
    pub vni: u32,
    pub subnet: Ipv4Network,
    pub mode: EgressMode,
}

/// Packets and bytes a `none` network's drop rule has counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for DropCount {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// What [`EgressNat::ensure`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The table already matched the desired state: nothing was sent to the kernel.
    Unchanged,
    /// The table was (re)written in one transaction.
    Replaced,
    /// No network wants a rule: the table was deleted (or was not there).
    Removed,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("the `nft` program is missing (install the nftables package): {0}")]
    NftMissing(#[source] std::io::Error),
    #[error("nft: {0}")]
    Nft(#[source] NftablesError),
    #[error("nft {hint}: {stderr}")]
    NftFailed { hint: String, stderr: String },
    #[error("network {network}: the name cannot be carried in a rule comment")]
    BadNetworkName { network: String },
}

impl From<NftablesError> for EgressError {
    fn from(error: NftablesError) -> Self {
        match error {
            NftablesError::NftExecution { inner, .. }
                if inner.kind() == std::io::ErrorKind::NotFound =>
            {
                Self::NftMissing(inner)
            }
            NftablesError::NftFailed { hint, stderr, .. } => Self::NftFailed { hint, stderr },
            other => Self::Nft(other),
        }
    }
}

pub type Result<T, E = EgressError> = std::result::Result<T, E>;

/// The owner of the `overlay_egress` table in the calling thread's network namespace.
#[derive(Debug, Default)]
pub struct EgressNat {
    /// Drops counted by rules that a later change replaced, so that
    /// [`EgressNat::drops`] only ever grows while this owner lives.
    carried: BTreeMap<String, DropCount>,
    /// The `nft` program; `None` looks it up in `PATH`.
    program: Option<OsString>,
}

impl EgressNat {
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `program` instead of `nft` from `PATH`.
    pub fn with_program(program: impl Into<OsString>) -> Self {
        Self {
            program: Some(program.into()),
            ..Self::default()
        }
    }

    /// Brings the table in step with `rules`; `overlay_subnets` must list the subnets of
    /// ALL networks of the cluster (traffic to them is never NATed or dropped here).
    /// Idempotent: an up-to-date table is left alone. With no network that needs a rule
    /// the table is removed.
    pub fn ensure(
        &mut self,
        rules: &[EgressRule],
        overlay_subnets: &[Ipv4Network],
    ) -> Result<Applied> {
        let desired = DesiredTable::new(rules, overlay_subnets)?;
        if desired.rules.is_empty() {
            self.remove()?;
            return Ok(Applied::Removed);
        }
        let current = self.read()?;
        if current.as_ref().is_some_and(|c| c.matches(&desired)) {
            return Ok(Applied::Unchanged);
        }
        if let Some(current) = &current {
            self.carry(current);
        }
        self.apply(desired.replace_commands())?;
        info!(
            table = TABLE,
            rules = desired.rules.len(),
            "egress rules installed"
        );
        Ok(Applied::Replaced)
    }

    /// Deletes the table, if it is there. Returns whether it was.
    pub fn remove(&mut self) -> Result<bool> {
        let Some(current) = self.read()? else {
            return Ok(false);
        };
        self.carry(&current);
        // Adding first makes the delete valid whether or not someone removed it since.
        let commands = vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
        ];
        self.apply(commands)?;
        info!(table = TABLE, "egress rules removed");
        Ok(true)
    }

    /// Drops counted per `none` network (by name), including those of rules replaced
    /// since this owner was created.
    pub fn drops(&self) -> Result<BTreeMap<String, DropCount>> {
        let mut all = self.carried.clone();
        if let Some(current) = self.read()? {
            for (network, count) in current.drops {
                *all.entry(network).or_default() += count;
            }
        }
        Ok(all)
    }

    fn carry(&mut self, current: &CurrentTable) {
        for (network, count) in &current.drops {
            *self.carried.entry(network.clone()).or_default() += *count;
        }
    }

    fn apply(&self, commands: Vec<NfObject<'static>>) -> Result<()> {
        let document = Nftables {
            objects: Cow::Owned(commands),
        };
        helper::apply_ruleset_with_args(&document, self.program.as_ref(), helper::DEFAULT_ARGS)?;
        Ok(())
    }

    /// The table as the kernel has it, or `None` when there is none.
    fn read(&self) -> Result<Option<CurrentTable>> {
        let tables =
            helper::get_current_ruleset_with_args(self.program.as_ref(), ["list", "tables", "ip"])?;
        let exists = tables.objects.iter().any(|object| {
            matches!(object, NfObject::ListObject(NfListObject::Table(t)) if t.name == TABLE)
        });
        if !exists {
            return Ok(None);
        }
        let listing = helper::get_current_ruleset_with_args(
            self.program.as_ref(),
            ["list", "table", "ip", TABLE],
        )?;
        Ok(Some(CurrentTable::parse(&listing)))
    }
}

/// The rules the desired state asks for, each with the comment that identifies it.
#[derive(Debug)]
struct DesiredTable {
    /// (chain, comment, statements), in the order they are installed.
    rules: Vec<(&'static str, String, Vec<Statement<'static>>)>,
    /// The elements of [`SUBNET_SET`]: no two overlap (an interval set refuses that).
    excluded: Vec<Ipv4Network>,
}

impl DesiredTable {
    fn new(rules: &[EgressRule], overlay_subnets: &[Ipv4Network]) -> Result<Self> {
        let mut excluded: Vec<Ipv4Network> = overlay_subnets
            .iter()
            .chain(rules.iter().map(|r| &r.subnet))
            .copied()
            .collect();
        excluded.sort();
        excluded.dedup();
        let excluded = outermost(excluded);
        let fingerprint = fingerprint(&excluded);
        let mut sorted: Vec<&EgressRule> = rules.iter().collect();
        sorted.sort_by(|a, b| a.network.cmp(&b.network));
        let mut out = Vec::new();
        for rule in sorted {
            if rule.network.is_empty() || rule.network.contains(char::is_whitespace) {
                return Err(EgressError::BadNetworkName {
                    network: rule.network.clone(),
                });
            }
            let comment = format!(
                "{} {} {} vni {} overlay {fingerprint:016x}",
                rule.mode, rule.network, rule.subnet, rule.vni
            );
            let mut statements = vec![
                ip_match("saddr", Operator::EQ, prefix(rule.subnet)),
                ip_match(
                    "daddr",
                    Operator::NEQ,
                    Expression::String(format!("@{SUBNET_SET}").into()),
                ),
            ];
            let chain = match rule.mode {
                EgressMode::Masquerade => {
                    statements.push(Statement::Masquerade(None));
                    NAT_CHAIN
                }
                EgressMode::None => {
                    statements.push(Statement::Counter(Counter::Anonymous(None)));
                    statements.push(Statement::Drop(Some(Drop {})));
                    FILTER_CHAIN
                }
            };
            out.push((chain, comment, statements));
        }
        Ok(Self {
            rules: out,
            excluded,
        })
    }

    /// One transaction: the table is created if missing, deleted with everything in it,
    /// and built anew, so the kernel never holds a half-updated table.
    fn replace_commands(&self) -> Vec<NfObject<'static>> {
        let mut commands = vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table()))),
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table()))),
            add_chain(
                NAT_CHAIN,
                NfChainType::NAT,
                NfHook::Postrouting,
                SRCNAT_PRIORITY,
            ),
            add_chain(
                FILTER_CHAIN,
                NfChainType::Filter,
                NfHook::Forward,
                FILTER_PRIORITY,
            ),
            NfObject::CmdObject(NfCmd::Add(NfListObject::Set(Box::new(subnet_set(
                &self.excluded,
            ))))),
        ];
        for (chain, comment, statements) in &self.rules {
            commands.push(NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
                family: FAMILY,
                table: TABLE.into(),
                chain: (*chain).into(),
                expr: statements.clone().into(),
                comment: Some(comment.clone().into()),
                ..Rule::default()
            }))));
        }
        commands
    }
}

/// What the kernel's copy of the table holds, as far as this module cares.
#[derive(Debug, Default)]
struct CurrentTable {
    chains: Vec<String>,
    sets: Vec<String>,
    /// (chain, comment) of every rule, in order.
    rules: Vec<(String, String)>,
    drops: BTreeMap<String, DropCount>,
}

impl CurrentTable {
    fn parse(listing: &Nftables<'_>) -> Self {
        let mut current = Self::default();
        for object in listing.objects.iter() {
            match object {
                NfObject::ListObject(NfListObject::Chain(chain)) if chain.table == TABLE => {
                    current.chains.push(chain.name.to_string());
                }
                NfObject::ListObject(NfListObject::Set(set)) if set.table == TABLE => {
                    current.sets.push(set.name.to_string());
                }
                NfObject::ListObject(NfListObject::Rule(rule)) if rule.table == TABLE => {
                    let comment = rule.comment.as_deref().unwrap_or_default().to_string();
                    if rule.chain == FILTER_CHAIN {
                        if let (Some(network), Some(count)) =
                            (comment_network(&comment), rule_counter(&rule.expr))
                        {
                            current.drops.insert(network.to_string(), count);
                        }
                    }
                    current.rules.push((rule.chain.to_string(), comment));
                }
                _ => {}
            }
        }
        current
    }

    fn matches(&self, desired: &DesiredTable) -> bool {
        let has_chains = [NAT_CHAIN, FILTER_CHAIN]
            .iter()
            .all(|name| self.chains.iter().any(|c| c == name));
        // The set's elements are those the rules' fingerprint names (only this module
        // writes them, in the same transaction as the rules).
        has_chains
            && self.sets.iter().any(|s| s == SUBNET_SET)
            && self.rules.len() == desired.rules.len()
            && self.rules.iter().zip(&desired.rules).all(
                |((chain, comment), (want_chain, want_comment, _))| {
                    chain == want_chain && comment == want_comment
                },
            )
    }
}

/// The network a rule comment names (`MODE NETWORK SUBNET ...`).
fn comment_network(comment: &str) -> Option<&str> {
    comment.split_whitespace().nth(1)
}

fn rule_counter(statements: &[Statement<'_>]) -> Option<DropCount> {
    statements.iter().find_map(|statement| match statement {
        Statement::Counter(Counter::Anonymous(counter)) => {
            let AnonymousCounter { packets, bytes } = counter.clone().unwrap_or_default();
            Some(DropCount {
                packets: packets.unwrap_or(0) as u64,
                bytes: bytes.unwrap_or(0) as u64,
            })
        }
        _ => None,
    })
}

fn table() -> Table<'static> {
    Table {
        family: FAMILY,
        name: TABLE.into(),
        ..Table::default()
    }
}

fn add_chain(name: &'static str, kind: NfChainType, hook: NfHook, prio: i32) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })))
}

fn ip_match(field: &'static str, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: "ip".into(),
                field: field.into(),
            },
        ))),
        right,
        op,
    })
}

fn prefix(subnet: Ipv4Network) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(subnet.network().to_string().into())),
        len: u32::from(subnet.prefix()),
    }))
}

fn subnet_set(subnets: &[Ipv4Network]) -> Set<'static> {
    let elements: Vec<Expression<'static>> = subnets.iter().map(|s| prefix(*s)).collect();
    Set {
        family: FAMILY,
        table: TABLE.into(),
        name: SUBNET_SET.into(),
        set_type: SetTypeValue::Single(SetType::Ipv4Addr),
        flags: Some([SetFlag::Interval].into_iter().collect()),
        // An empty set is written without elements (nft refuses an empty list).
        elem: (!elements.is_empty()).then(|| elements.into()),
        ..Set::default()
    }
}

/// `sorted` without the subnets that lie inside another one (CIDR blocks either nest or
/// are apart, so after sorting by address and length a contained one follows its
/// container).
fn outermost(sorted: Vec<Ipv4Network>) -> Vec<Ipv4Network> {
    let mut out: Vec<Ipv4Network> = Vec::with_capacity(sorted.len());
    for subnet in sorted {
        if !out
            .last()
            .is_some_and(|kept| kept.contains(subnet.network()))
        {
            out.push(subnet);
        }
    }
    out
}

/// FNV-1a over the excluded subnets: stable across processes and releases, so a
/// restarted agent recognises the table its predecessor wrote.
fn fingerprint(subnets: &[Ipv4Network]) -> u64 {
    subnets
        .iter()
        .flat_map(|s| s.network().octets().into_iter().chain([s.prefix()]))
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests;
