fn main() {
    print!("{}", mail_oauth_operator::api::crds::to_yaml().expect("crds"));
}
