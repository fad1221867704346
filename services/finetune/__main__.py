from services.common.stage_main import main
from services.gen.cfrseg.v1 import finetune_pb2_grpc

if __name__ == "__main__":
    main("finetune", "cfrseg.v1.FinetuneService", finetune_pb2_grpc.add_FinetuneServiceServicer_to_server,
         "services.finetune.stage:run")
