module gatehouse.dev/examples

go 1.21

require gatehouse.dev/go v0.0.0

replace gatehouse.dev/go => ../../go
