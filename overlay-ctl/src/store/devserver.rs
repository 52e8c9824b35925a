#[derive(clap::Args, Debug)]
pub struct DevServerArgs {}

pub async fn run(_args: DevServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("dev server not built in")
}
