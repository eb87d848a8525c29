fn main() -> std::process::ExitCode {
    crisp_bridge::cli::main()
}
