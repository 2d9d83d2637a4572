module gatehouse.dev/go

go 1.21
